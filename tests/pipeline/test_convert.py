"""Raw trees -> COCO-format split files: determinism, anomalies, split rules, COCO 2017."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from fssd.data.synthetic import CLASSES, generate_scenes
from pipeline.convert import (
    VOC_CLASSES,
    ConversionError,
    ImageHeaderError,
    convert_coco,
    convert_dataset,
    convert_voc,
    read_image_size,
)

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><size><width>64</width><height>48</height></size>
<object><name>&lol9;</name><difficult>0</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
</annotation>
"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><size><width>64</width><height>48</height></size>
<object><name>&xxe;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
</annotation>
"""


def _xml(w: int, h: int, objects: list[tuple], size: bool = True) -> str:
    parts = ["<annotation>", "<folder>VOC2007</folder>"]
    if size:
        parts.append(f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _voc_tree(root: Path, year: str, items: dict[str, tuple[str | None, bytes | None]], sets: dict[str, list[str]]) -> Path:
    """A VOC tree under root/VOCdevkit/VOC<year>; items: id -> (xml text or None, image or None)."""
    d = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (xml, img) in items.items():
        if xml is not None:
            (d / "Annotations" / f"{image_id}.xml").write_text(xml)
        if img is not None:
            (d / "JPEGImages" / f"{image_id}.jpg").write_bytes(img)
    for name, ids in sets.items():
        (d / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return d


@pytest.fixture
def messy_voc(tmp_path) -> Path:
    """data root with raw/VOCdevkit/VOC2007 holding one of each problem."""
    good = _jpeg(64, 48)
    items = {
        "000001": (
            _xml(64, 48, [
                ("dog", (1, 1, 10, 20), 1),        # difficult -> ignore
                ("person", (5, 6, 64, 48), 0),      # exactly the full extent: not clipped
                ("cat", (50, 40, 80, 60), 0),       # outside -> clipped
                ("cow", (30, 10, 20, 30), 0),       # xmax < xmin -> degenerate
                ("unicorn", (2, 2, 8, 8), 0),       # unknown class
                ("bird", ("abc", 1, 4, 4), 0),      # malformed
                ("horse", (70, 50, 90, 60), 0),     # entirely outside -> degenerate after clip
            ]),
            good,
        ),
        "000002": (BILLION_LAUGHS, good),
        "000003": (_xml(64, 48, [("dog", (1, 1, 5, 5), 0)]), good[: len(good) // 2]),  # truncated
        "000004": (_xml(100, 100, [("dog", (1, 1, 5, 5), 0)]), good),  # size mismatch
        "000005": (_xml(64, 48, [("dog", (1, 1, 5, 5), 0)]), None),  # image missing
        "000006": (None, good),  # annotation missing
        "000007": (_xml(64, 48, [("unicorn", (1, 1, 5, 5), 0)]), good),  # no objects left
        "000008": (XXE, good),
        "000009": (_xml(64, 48, [("car", (3, 4, 5, 9), 0)], size=False), good),  # size from image
        "000010": ("<annotation><size>", good),  # unparsable
    }
    ids = sorted(items)
    _voc_tree(tmp_path / "raw", "2007", items, {"test": ids})
    return tmp_path


@pytest.mark.timeout(60)
def test_voc_anomalies_are_counted(messy_voc, tmp_path):
    out = tmp_path / "out" / "test.json"
    report = convert_voc(messy_voc, [("raw/VOCdevkit/VOC2007", "test")], out)
    r = report.to_dict()
    counts = {k: v["count"] for k, v in r["anomalies"].items()}
    assert counts == {
        "annotation_unparsable": 3,
        "annotation_missing": 1,
        "image_unreadable": 1,
        "size_mismatch": 1,
        "image_missing": 1,
        "box_clipped": 1,
        "box_degenerate": 2,
        "unknown_class": 2,
        "box_malformed": 1,
        "image_no_objects": 1,
        "size_from_image": 1,
    }
    ex = r["anomalies"]
    assert any("raw/VOCdevkit/VOC2007/Annotations/000002.xml" in e for e in ex["annotation_unparsable"]["examples"])
    assert any("000008.xml" in e for e in ex["annotation_unparsable"]["examples"])
    assert ex["image_unreadable"]["examples"] == ["raw/VOCdevkit/VOC2007/JPEGImages/000003.jpg"]
    assert ex["annotation_missing"]["examples"] == ["raw/VOCdevkit/VOC2007/Annotations/000006.xml"]
    assert r["images_listed"] == 10 and r["bad_images"] == 7 and r["images_written"] == 3
    assert r["sources"] == ["raw/VOCdevkit/VOC2007:test"]

    coco = json.loads(out.read_text())
    assert [im["file_name"] for im in coco["images"]] == [
        f"raw/VOCdevkit/VOC2007/JPEGImages/{i}.jpg" for i in ("000001", "000007", "000009")
    ]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert [names[i] for i in range(1, 21)] == list(VOC_CLASSES)
    by_img = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append((names[a["category_id"]], a["bbox"], a["area"], a["ignore"], a["iscrowd"]))
    first = by_img[1]
    assert first == [
        ("dog", [0.0, 0.0, 10.0, 20.0], 200.0, 1, 0),  # 1-based inclusive -> x = xmin - 1, w = xmax - x
        ("person", [4.0, 5.0, 60.0, 43.0], 2580.0, 0, 0),
        ("cat", [49.0, 39.0, 15.0, 9.0], 135.0, 0, 0),
    ]
    img9 = next(im for im in coco["images"] if im["file_name"].endswith("000009.jpg"))
    assert (img9["width"], img9["height"]) == (64, 48)
    assert by_img[img9["id"]] == [("car", [2.0, 3.0, 3.0, 6.0], 18.0, 0, 0)]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert by_img.get(2) is None  # 000007 kept without objects (keep_empty)
    assert COCO(str(out)).getImgIds() == [im["id"] for im in coco["images"]]


def test_voc_too_many_bad_images_fails_naming_files(messy_voc, tmp_path):
    out = tmp_path / "out" / "test.json"
    with pytest.raises(ConversionError) as exc:
        convert_voc(messy_voc, [("raw/VOCdevkit/VOC2007", "test")], out, max_bad_fraction=0.5)
    msg = str(exc.value)
    assert "7 of 10 images are bad" in msg
    assert "raw/VOCdevkit/VOC2007/Annotations/000002.xml" in msg
    assert "raw/VOCdevkit/VOC2007/JPEGImages/000003.jpg" in msg
    assert "max_bad_fraction" in msg
    assert isinstance(exc.value, ValueError)
    assert not out.exists()
    convert_voc(messy_voc, [("raw/VOCdevkit/VOC2007", "test")], out, max_bad_fraction=0.7)
    assert out.exists()


def test_missing_image_set_is_a_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="ImageSets/Main/trainval.txt"):
        convert_voc(tmp_path, [("raw/VOCdevkit/VOC2007", "trainval")], tmp_path / "x.json")
    with pytest.raises(ConversionError, match="PASCAL VOC 2007 not found"):
        convert_dataset("voc2007", tmp_path / "raw", tmp_path / "processed", tmp_path, 0.01)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        convert_dataset("imagenet", tmp_path / "raw", tmp_path / "processed", tmp_path, 0.01)
    with pytest.raises(ConversionError, match="not inside the data root"):
        convert_dataset("synthetic", tmp_path.parent, tmp_path / "processed", tmp_path, 0.01)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_scenes(root / "raw" / "synthetic", 30, seed=1, workers=1)
    return root


def test_synthetic_conversion_is_byte_identical(synthetic_root, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        report = convert_dataset("synthetic", synthetic_root / "raw", out, synthetic_root, 0.0)
        assert report["ok"] and report["classes"] == list(CLASSES)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert sorted(outs[0]) == ["report.json", "test.json", "train.json", "val.json"]
    assert outs[0] == outs[1]
    for name, data in outs[0].items():
        text = data.decode()
        assert text.endswith("}\n") and "\n" not in text[:-1] and ": " not in text
        assert json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")) + "\n" == text

    splits = {s: json.loads(outs[0][f"{s}.json"]) for s in ("train", "val", "test")}
    assert [len(splits[s]["images"]) for s in ("train", "val", "test")] == [24, 3, 3]
    train = splits["train"]
    assert train["categories"] == [
        {"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(CLASSES)
    ]
    assert all(im["file_name"].startswith("raw/synthetic/JPEGImages/") for im in train["images"])
    assert (synthetic_root / train["images"][0]["file_name"]).is_file()
    assert [a["id"] for a in train["annotations"]] == list(range(1, len(train["annotations"]) + 1))
    n_ignored = sum(a["ignore"] for s in splits.values() for a in s["annotations"])
    assert n_ignored == sum(report["splits"][s]["ignored"] for s in splits)
    coco = COCO(str(tmp_path / "a" / "train.json"))
    assert len(coco.getImgIds()) == 24 and len(coco.getCatIds()) == len(CLASSES)


def test_dataset_failure_keeps_previous_outputs(synthetic_root, tmp_path):
    out = tmp_path / "processed"
    convert_dataset("synthetic", synthetic_root / "raw", out, synthetic_root, 0.0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ids = (synthetic_root / "raw/synthetic/ImageSets/Main/val.txt").read_text().split()
    victim = synthetic_root / "raw/synthetic/JPEGImages" / f"{ids[0]}.jpg"
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved[:200])
        with pytest.raises(ConversionError) as exc:
            convert_dataset("synthetic", synthetic_root / "raw", out, synthetic_root, 0.2)
        assert f"raw/synthetic/JPEGImages/{ids[0]}.jpg" in str(exc.value) and "'val'" in str(exc.value)
        failed = json.loads((out / "report.failed.json").read_text())
        assert failed["ok"] is False and failed["splits"]["val"]["bad_images"] == 1
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "report.failed.json"}
        assert after == before
        # within the tolerance: converted, the image dropped and counted
        report = convert_dataset("synthetic", synthetic_root / "raw", out, synthetic_root, 0.5)
        assert report["splits"]["val"]["anomalies"]["image_unreadable"]["count"] == 1
        assert not (out / "report.failed.json").exists()
    finally:
        victim.write_bytes(saved)


def _split_files(out: Path, split: str) -> list[str]:
    return [im["file_name"] for im in json.loads((out / f"{split}.json").read_text())["images"]]


def _assert_disjoint(out: Path) -> None:
    names = {s: set(_split_files(out, s)) for s in ("train", "val", "test")}
    assert not names["val"] & names["test"], "val and test share images"
    assert not names["train"] & names["test"] and not names["train"] & names["val"]


def _voc0712_raw(tmp_path: Path) -> Path:
    img = _jpeg(40, 30)
    obj = _xml(40, 30, [("car", (2, 2, 20, 20), 0)])
    empty = _xml(40, 30, [])
    raw = tmp_path / "raw"
    trainval07 = [f"0000{i:02d}" for i in range(1, 21)]
    _voc_tree(raw, "2007", {f"0000{i:02d}": (obj if i != 3 else empty, img) for i in range(1, 27)},
              {"trainval": trainval07, "train": trainval07[:10], "val": trainval07[10:],
               "test": [f"0000{i:02d}" for i in range(21, 27)]})
    ids12 = [f"2008_0000{i:02d}" for i in range(1, 21)]
    _voc_tree(raw, "2012", {i: (obj, img) for i in ids12},
              {"trainval": ids12, "train": ids12[:12], "val": ids12[12:]})
    return raw


def test_voc0712_split_rules(tmp_path):
    """voc0712: val held out from 07+12 trainval (removed from train), test = 07 test; no image in
    two splits; the same choice every time, whatever the listing order."""
    raw = _voc0712_raw(tmp_path)
    r = convert_dataset("voc0712", raw, tmp_path / "p0712", tmp_path, 0.0, val_fraction=0.1)
    out = tmp_path / "p0712"
    _assert_disjoint(out)
    base = lambda names: sorted(n.split("/")[-1] for n in names)  # noqa: E731
    assert base(_split_files(out, "test")) == [f"0000{i:02d}.jpg" for i in range(21, 27)]
    val, train = _split_files(out, "val"), _split_files(out, "train")
    assert len(val) == 4 and r["val"] == {"from": "train", "val_fraction": 0.1, "val_max_images": None, "images": 4}
    pool = {f"raw/VOCdevkit/VOC2007/JPEGImages/0000{i:02d}.jpg" for i in range(1, 21)} | {
        f"raw/VOCdevkit/VOC2012/JPEGImages/2008_0000{i:02d}.jpg" for i in range(1, 21)}
    empty = "raw/VOCdevkit/VOC2007/JPEGImages/000003.jpg"
    # the held-out images leave train; the empty image is dropped from train (kept if held out)
    assert set(train) | set(val) == pool - ({empty} - set(val))
    if empty not in val:
        assert r["splits"]["train"]["anomalies"]["empty_image_dropped"]["examples"] == [empty]
    assert r["splits"]["train"]["sources"] == ["raw/VOCdevkit/VOC2007:trainval", "raw/VOCdevkit/VOC2012:trainval"]
    assert r["splits"]["val"]["images_written"] == 4
    # deterministic: the same held-out images again, and a cap applies
    convert_dataset("voc0712", raw, tmp_path / "again", tmp_path, 0.0, val_fraction=0.1)
    assert _split_files(tmp_path / "again", "val") == val
    convert_dataset("voc0712", raw, tmp_path / "capped", tmp_path, 0.0, val_fraction=0.1, val_max_images=2)
    assert len(_split_files(tmp_path / "capped", "val")) == 2
    # the paper's protocol: no validation split, all of trainval trains
    r0 = convert_dataset("voc0712", raw, tmp_path / "paper", tmp_path, 0.0, val_fraction=0.0)
    assert _split_files(tmp_path / "paper", "val") == [] and r0["val"]["images"] == 0
    assert len(_split_files(tmp_path / "paper", "train")) == 39  # 40 less the empty image


def test_voc2007_and_voc2012_split_rules(tmp_path):
    raw = _voc0712_raw(tmp_path)
    convert_dataset("voc2007", raw, tmp_path / "p07", tmp_path, 0.0)
    out07 = tmp_path / "p07"
    _assert_disjoint(out07)
    assert len(_split_files(out07, "train")) == 9  # 10 less the empty 000003
    assert len(_split_files(out07, "val")) == 10 and len(_split_files(out07, "test")) == 6
    r07 = json.loads((out07 / "report.json").read_text())
    assert r07["splits"]["train"]["anomalies"]["image_no_objects"]["count"] == 1
    assert r07["val"] == {"from": "dataset", "val_max_images": None}
    r12 = convert_dataset("voc2012", raw, tmp_path / "p12", tmp_path, 0.0, val_fraction=0.25)
    out12 = tmp_path / "p12"
    _assert_disjoint(out12)
    # test = VOC2012 val; val = 3 of the 12 VOC2012 train images, which leave train
    assert [f.split("/")[-1] for f in _split_files(out12, "test")] == [f"2008_0000{i:02d}.jpg" for i in range(13, 21)]
    assert len(_split_files(out12, "val")) == 3 and len(_split_files(out12, "train")) == 9
    assert r12["splits"]["val"]["sources"] == ["held out from train: 3 of 12 images"]


def test_synthetic_val_and_test_are_disjoint(tiny_data):
    _assert_disjoint(tiny_data / "processed")


def test_holdout_size_rules():
    from pipeline.convert import holdout_size

    assert holdout_size(100, 0.05, None) == 5
    assert holdout_size(100, 0.05, 3) == 3
    assert holdout_size(10, 0.01, None) == 1  # a positive fraction holds out at least one image
    assert holdout_size(2, 0.9, None) == 1  # train keeps one
    assert holdout_size(100, 0.0, None) == 0 and holdout_size(1, 0.5, None) == 0
    with pytest.raises(ValueError, match="val_fraction must be in"):
        convert_dataset("voc2007", Path("raw"), Path("out"), Path("."), 0.0, val_fraction=1.0)


def _coco_tree(root: Path) -> Path:
    coco_root = root / "raw" / "coco"
    (coco_root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (coco_root / split).mkdir()
        (coco_root / split / "000000000009.jpg").write_bytes(_jpeg(64, 48, 1))
        (coco_root / split / "000000000025.jpg").write_bytes(_jpeg(32, 32, 2))
    instances = {
        "info": {}, "licenses": [],
        "categories": [
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "images": [
            {"id": 25, "file_name": "000000000025.jpg", "width": 32, "height": 32},
            {"id": 9, "file_name": "000000000009.jpg", "width": 64, "height": 48},
            {"id": 30, "file_name": "000000000030.jpg", "width": 10, "height": 10},  # missing
        ],
        "annotations": [
            {"id": 7, "image_id": 9, "category_id": 90, "bbox": [1.5, 2.0, 10.25, 5.0], "area": 3.0, "iscrowd": 0,
             "segmentation": [[1, 2, 3, 4]]},
            {"id": 5, "image_id": 9, "category_id": 1, "bbox": [60.0, 40.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0},
            {"id": 6, "image_id": 9, "category_id": 3, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 1,
             "segmentation": {"counts": [], "size": [48, 64]}},
            {"id": 8, "image_id": 9, "category_id": 2, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0},
            {"id": 10, "image_id": 9, "category_id": 1, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},
            {"id": 11, "image_id": 12345, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0},
        ],
    }
    for split in ("train2017", "val2017"):
        (coco_root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    return coco_root


def test_coco_contiguous_ids(tmp_path):
    _coco_tree(tmp_path)
    out = tmp_path / "val.json"
    report = convert_coco(tmp_path, "raw/coco/annotations/instances_val2017.json", "raw/coco/val2017", out)
    coco = json.loads(out.read_text())
    assert coco["categories"] == [  # contiguous labels; the dataset's own ids kept as source_id
        {"id": 1, "name": "person", "supercategory": "person", "source_id": 1},
        {"id": 2, "name": "car", "supercategory": "vehicle", "source_id": 3},
        {"id": 3, "name": "toothbrush", "supercategory": "indoor", "source_id": 90},
    ]
    assert [(im["id"], im["file_name"]) for im in coco["images"]] == [
        (9, "raw/coco/val2017/000000000009.jpg"), (25, "raw/coco/val2017/000000000025.jpg")
    ]
    anns = {a["id"]: a for a in coco["annotations"]}
    assert sorted(anns) == [5, 6, 7]
    assert anns[7]["category_id"] == 3 and anns[7]["bbox"] == [1.5, 2.0, 10.25, 5.0] and anns[7]["area"] == 51.25
    assert anns[5]["category_id"] == 1 and anns[5]["bbox"] == [60.0, 40.0, 4.0, 8.0]  # clipped
    assert anns[6]["iscrowd"] == 1 and anns[6]["ignore"] == 1 and anns[6]["category_id"] == 2
    assert "segmentation" not in anns[7]
    counts = {k: v["count"] for k, v in report.to_dict()["anomalies"].items()}
    assert counts == {"image_missing": 1, "box_clipped": 1, "unknown_class": 1, "box_degenerate": 1,
                      "annotation_orphan": 1, "image_no_objects": 1}
    loaded = COCO(str(out))
    assert loaded.getCatIds() == [1, 2, 3] and sorted(loaded.getImgIds()) == [9, 25]

    # train2017 gets two more annotated images, so that train keeps some after the hold-out
    train_json = tmp_path / "raw/coco/annotations/instances_train2017.json"
    instances = json.loads(train_json.read_text())
    for k, image_id in enumerate((40, 41)):
        (tmp_path / f"raw/coco/train2017/0000000000{image_id}.jpg").write_bytes(_jpeg(32, 32, 3 + k))
        instances["images"].append({"id": image_id, "file_name": f"0000000000{image_id}.jpg", "width": 32, "height": 32})
        instances["annotations"].append({"id": 100 + k, "image_id": image_id, "category_id": 3, "bbox": [1, 1, 8, 8],
                                         "area": 64, "iscrowd": 0})
    train_json.write_text(json.dumps(instances))
    r = convert_dataset("coco2017", tmp_path / "raw", tmp_path / "processed", tmp_path, 0.5, val_fraction=0.3)
    assert r["classes"] == ["person", "car", "toothbrush"]
    out = tmp_path / "processed"
    _assert_disjoint(out)
    # val: one image held out of train2017; test: val2017; the empty image never trains
    train, val = _split_files(out, "train"), _split_files(out, "val")
    assert len(val) == 1 and val[0].startswith("raw/coco/train2017/")
    pool = {f"raw/coco/train2017/0000000000{i:02d}.jpg" for i in (9, 25, 40, 41)}
    assert set(train) | set(val) == pool - ({"raw/coco/train2017/000000000025.jpg"} - set(val))
    assert _split_files(out, "test") == [
        "raw/coco/val2017/000000000009.jpg", "raw/coco/val2017/000000000025.jpg"
    ]


def test_read_image_size(tmp_path):
    jpg = tmp_path / "a.jpg"
    jpg.write_bytes(_jpeg(37, 21))
    assert read_image_size(jpg) == (37, 21)
    ok, png = cv2.imencode(".png", np.zeros((13, 17, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(png.tobytes())
    assert read_image_size(tmp_path / "a.png") == (17, 13)
    (tmp_path / "trailing.jpg").write_bytes(_jpeg(37, 21) + b"\0" * 200)  # data after EOI: still fine
    assert read_image_size(tmp_path / "trailing.jpg") == (37, 21)
    for name, data in [("t.png", png.tobytes()[:-30]), ("t.jpg", _jpeg(37, 21)[:-10]),
                       ("h.jpg", _jpeg(37, 21)[:30]), ("x.jpg", b"not an image"), ("e.jpg", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageHeaderError):
            read_image_size(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_image_size(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------------------------
# Your own data


def test_custom_voc_export_with_own_classes_and_no_image_sets(tmp_path, exports):
    from pipeline.convert import Layout, convert_custom

    exports.voc(tmp_path / "raw" / "export")
    r = convert_custom("voc", tmp_path / "raw", tmp_path / "processed", tmp_path, 0.0,
                       val_fraction=0.2, test_fraction=0.2)
    out = tmp_path / "processed"
    assert r["classes"] == ["apple", "pear", "plum"] and r["classes_found"] == ["apple", "pear", "plum"]
    assert r["export_root"] == "raw/export"
    _assert_disjoint(out)
    counts = {s: len(_split_files(out, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 15, "val": 4, "test": 5}
    assert sorted(r["held_out"]["test"]) == sorted(_split_files(out, "test"))
    names = [f for s in ("train", "val", "test") for f in _split_files(out, s)]
    assert "raw/export/JPEGImages/batch 2/img 000.jpg" in names and "raw/export/JPEGImages/img 001.png" in names
    train = json.loads((out / "train.json").read_text())
    assert [c["name"] for c in train["categories"]] == ["apple", "pear", "plum"]
    # the same again, byte for byte (deterministic hold-out)
    first = {s: (out / f"{s}.json").read_bytes() for s in ("train", "val", "test")}
    convert_custom("voc", tmp_path / "raw", out, tmp_path, 0.0, val_fraction=0.2, test_fraction=0.2)
    assert {s: (out / f"{s}.json").read_bytes() for s in ("train", "val", "test")} == first
    # given classes: their order is the label order; other names are counted and dropped
    r2 = convert_custom("voc", tmp_path / "raw", tmp_path / "p2", tmp_path, 0.0, classes=("plum", "apple"),
                        layout=Layout(root="export"))
    assert r2["classes"] == ["plum", "apple"] and r2["splits"]["train"]["anomalies"]["unknown_class"]["count"] > 0


def test_custom_voc_errors_name_the_key_before_writing(tmp_path, exports):
    from pipeline.convert import ConversionError, Layout, convert_custom

    out = tmp_path / "processed"
    with pytest.raises(ConversionError, match="no VOC annotations"):
        (tmp_path / "raw" / "empty").mkdir(parents=True)
        convert_custom("voc", tmp_path / "raw", out, tmp_path, 0.0)
    exports.voc(tmp_path / "raw" / "export")
    with pytest.raises(ConversionError, match=r"data.classes \['Apple'\] match no object"):
        convert_custom("voc", tmp_path / "raw", out, tmp_path, 0.0, classes=("Apple",), layout=Layout(root="export"))
    with pytest.raises(ConversionError, match="data.layout.images: .* does not exist"):
        convert_custom("voc", tmp_path / "raw", out, tmp_path, 0.0, layout=Layout(root="export", images="pics"))
    for f in (tmp_path / "raw" / "export" / "JPEGImages").glob("img 00*"):
        f.unlink()  # images referenced but missing
    with pytest.raises(ConversionError, match="image_missing"):
        convert_custom("voc", tmp_path / "raw", out, tmp_path, 0.0, layout=Layout(root="export"))
    assert not (out / "train.json").exists()


def test_custom_coco_export_keeps_its_category_ids(tmp_path, exports):
    from pipeline.convert import convert_custom

    exports.coco(tmp_path / "raw" / "ls")
    r = convert_custom("coco", tmp_path / "raw", tmp_path / "processed", tmp_path, 0.0,
                       val_fraction=0.2, test_fraction=0.2)
    out = tmp_path / "processed"
    _assert_disjoint(out)
    assert r["classes"] == ["bolt", "nut", "washer"] and r["category_ids"] == [3, 17, 90]
    assert r["categories_without_annotations"] == ["0: unused"]
    test = json.loads((out / "test.json").read_text())
    assert test["categories"] == [{"id": 1, "name": "bolt", "supercategory": "", "source_id": 3},
                                  {"id": 2, "name": "nut", "supercategory": "", "source_id": 17},
                                  {"id": 3, "name": "washer", "supercategory": "", "source_id": 90}]
    assert {a["category_id"] for s in ("train", "val", "test")
            for a in json.loads((out / f"{s}.json").read_text())["annotations"]} == {1, 2, 3}
    assert test["images"][0]["file_name"].startswith("raw/ls/images/photo ")


def test_custom_coco_per_split_files_like_roboflow(tmp_path, exports):
    """Roboflow: train/ valid/ test/ folders, each with _annotations.coco.json and its images."""
    from pipeline.convert import convert_custom

    base = tmp_path / "raw" / "rf"
    for split in ("train", "valid", "test"):
        exports.coco(base / split, n=6)
        data = json.loads((base / split / "result.json").read_text())
        for im in data["images"]:
            im["file_name"] = im["file_name"].split("/")[-1]
            (base / split / "images" / im["file_name"]).rename(base / split / im["file_name"])
        (base / split / "_annotations.coco.json").write_text(json.dumps(data))
        (base / split / "result.json").unlink()
    r = convert_custom("coco", tmp_path / "raw", tmp_path / "processed", tmp_path, 0.0)
    assert r["held_out"] == {}
    assert [len(_split_files(tmp_path / "processed", s)) for s in ("train", "val", "test")] == [6, 6, 6]
    assert _split_files(tmp_path / "processed", "val")[0].startswith("raw/rf/valid/")
