"""The embedded synthetic dataset: determinism, content and the archive."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import cv2
import defusedxml.ElementTree as DET
import numpy as np
import pytest

from fssd.data import synthetic
from fssd.data.synthetic import CLASSES, generate_scenes, write_scenes_archive


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _objects(xml_path: Path) -> tuple[tuple[int, int], list[dict]]:
    root = DET.parse(str(xml_path)).getroot()
    size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
    objs = []
    for o in root.findall("object"):
        objs.append(
            {
                "name": o.findtext("name"),
                "difficult": int(o.findtext("difficult")),
                "truncated": int(o.findtext("truncated")),
                "box": tuple(int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")),
            }
        )
    return size, objs


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "synthetic"
    # harder than the default scenes, so that tiny (difficult) objects occur
    summary = generate_scenes(out, 50, seed=3, workers=1, objects_per_image=(1, 10),
                              object_size_range=(0.05, 0.8), max_occlusion=0.6)
    return out, summary


def test_layout_and_summary(scenes):
    root, summary = scenes
    ids = [f"{i:06d}" for i in range(1, 51)]
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == ids
    assert sorted(p.stem for p in (root / "Annotations").iterdir()) == ids
    split_ids = {}
    for s in ("train", "val", "test"):
        lines = (root / "ImageSets" / "Main" / f"{s}.txt").read_text().splitlines()
        assert lines == sorted(lines)
        split_ids[s] = set(lines)
    assert [len(split_ids[s]) for s in ("train", "val", "test")] == [40, 5, 5]
    assert split_ids["train"] | split_ids["val"] | split_ids["test"] == set(ids)
    assert not (split_ids["train"] & split_ids["val"]) and not (split_ids["val"] & split_ids["test"])
    assert summary["splits"] == {"train": 40, "val": 5, "test": 5}
    assert summary["classes"] == list(CLASSES)
    assert not list(root.parent.glob("*.tmp-*")), "temporary folder left behind"


def test_content(scenes):
    root, summary = scenes
    names, n_objects, sides, difficult_sides, truncated, at_border = set(), 0, [], [], 0, 0
    for xml in sorted((root / "Annotations").glob("*.xml")):
        (w, h), objs = _objects(xml)
        assert 250 <= w <= 500 and 250 <= h <= 500
        img = cv2.imread(str(root / "JPEGImages" / f"{xml.stem}.jpg"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (h, w, 3)
        root_el = DET.parse(str(xml)).getroot()
        assert root_el.findtext("filename") == f"{xml.stem}.jpg"
        assert root_el.findtext("size/depth") == "3"
        assert 1 <= len(objs) <= 10
        for o in objs:
            xmin, ymin, xmax, ymax = o["box"]
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
            side = max(xmax - xmin + 1, ymax - ymin + 1)
            assert o["difficult"] == int(side < 16)
            names.add(o["name"])
            sides.append(side / min(w, h))
            truncated += o["truncated"]
            if o["difficult"]:
                difficult_sides.append(side)
            if o["truncated"]:  # cut by the border: the box touches it (unless occluded there)
                at_border += xmin == 1 or ymin == 1 or xmax == w or ymax == h
        n_objects += len(objs)
    assert len(CLASSES) >= 6 and names == set(CLASSES)
    assert summary["num_objects"] == n_objects
    assert difficult_sides and summary["num_difficult"] == len(difficult_sides)
    assert truncated > 0 and summary["num_truncated"] == truncated
    assert at_border >= 0.9 * truncated
    assert min(sides) < 0.07 and max(sides) > 0.5  # ~5% .. 80% of the image side


def test_default_scenes_stay_in_their_ranges(tmp_path):
    summary = generate_scenes(tmp_path / "d", 20, seed=4, workers=1)
    counts, sides = [], []
    for xml in (tmp_path / "d" / "Annotations").glob("*.xml"):
        (w, h), objs = _objects(xml)
        counts.append(len(objs))
        sides += [max(o["box"][2] - o["box"][0] + 1, o["box"][3] - o["box"][1] + 1) / min(w, h) for o in objs]
    assert 1 <= min(counts) and max(counts) <= 6 and summary["num_objects"] == sum(counts)
    assert max(sides) <= 0.64  # at most the diameter (60% of the side); a cross reaches 1.06x its radius


def test_boxes_are_tight_on_a_plain_scene(monkeypatch):
    # flat black background, lossless encoding: each box must touch object pixels on all four
    # sides (the tight box of the visible shape) and the image border where truncated
    monkeypatch.setattr(synthetic, "_background", lambda rng, h, w: np.zeros((h, w, 3), np.uint8))
    real_encode = cv2.imencode
    monkeypatch.setattr(cv2, "imencode", lambda ext, img, params=(): real_encode(".png", img))
    params = synthetic._SceneParams(7, 250, 300, 100, 16, 1, 10, 0.05, 0.8, 0.6, 0.5)
    n_checked = 0
    for index in range(6):
        png, records, w, h = synthetic._render_scene(index, params)
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (h, w, 3)
        lit = img.max(axis=2) > 45  # objects: V >= 110 with shading >= 0.8; noise sigma <= 10
        for r in records:
            xmin, ymin, xmax, ymax = (v - 1 for v in r["bbox"])
            for edge in (lit[ymin, xmin : xmax + 1], lit[ymax, xmin : xmax + 1],
                         lit[ymin : ymax + 1, xmin], lit[ymin : ymax + 1, xmax]):
                assert edge.any(), (index, r)
            n_checked += 1
    assert n_checked >= 6


def test_deterministic(tmp_path):
    generate_scenes(tmp_path / "a", 6, seed=11, workers=1)
    generate_scenes(tmp_path / "b", 6, seed=11, workers=1)
    generate_scenes(tmp_path / "c", 6, seed=12, workers=1)
    a, b, c = (_tree_digest(tmp_path / n) for n in "abc")
    assert a == b
    for i in range(1, 7):
        assert a[f"JPEGImages/{i:06d}.jpg"] != c[f"JPEGImages/{i:06d}.jpg"]


def test_workers_do_not_change_the_output(tmp_path):
    generate_scenes(tmp_path / "serial", 40, seed=5, workers=1)
    generate_scenes(tmp_path / "parallel", 40, seed=5, workers=2)
    assert _tree_digest(tmp_path / "serial") == _tree_digest(tmp_path / "parallel")


def test_regenerate_replaces_and_interrupt_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    generate_scenes(out, 5, seed=0, workers=1)
    generate_scenes(out, 3, seed=0, workers=1)
    assert len(list((out / "JPEGImages").iterdir())) == 3

    real = synthetic._render_scene

    def boom(index, p):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, p)

    monkeypatch.setattr(synthetic, "_render_scene", boom)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        generate_scenes(fresh, 5, seed=0, workers=1)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_images": 0},
        {"split_fractions": (0.5, 0.5)},
        {"split_fractions": (0.8, 0.1, 0.2)},
        {"min_size": 400, "max_size": 300},
        {"jpeg_quality": 0},
        {"max_occlusion": 1.0},
        {"seed": -1},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    args = {"num_images": 3} | kwargs
    with pytest.raises(ValueError):
        generate_scenes(tmp_path / "x", **args)


def test_archive_is_deterministic(tmp_path):
    a = write_scenes_archive(tmp_path / "a" / "synthetic.tar", 8, seed=2)
    b = write_scenes_archive(tmp_path / "b" / "synthetic.tar", 8, seed=2)
    data = (tmp_path / "a" / "synthetic.tar").read_bytes()
    assert data == (tmp_path / "b" / "synthetic.tar").read_bytes()
    assert a["size"] == len(data) and a["num_images"] == b["num_images"] == 8
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["synthetic.tar"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert names[0] == "synthetic" and all(n == "synthetic" or n.startswith("synthetic/") for n in names)
        assert "synthetic/ImageSets/Main/train.txt" in names
        assert all(m.isdir() or m.isfile() for m in members)
        assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 946684800)}
        assert not any(m.pax_headers for m in members)
        tar.extractall(tmp_path / "x", filter="data")
    generate_scenes(tmp_path / "direct", 8, seed=2, workers=1)
    assert _tree_digest(tmp_path / "x" / "synthetic") == _tree_digest(tmp_path / "direct")
