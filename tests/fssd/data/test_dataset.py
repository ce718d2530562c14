"""DetectionDataset over COCO-format split files, per-sample seeding, and detection_collate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fssd.data.collate import detection_collate
from fssd.data.dataset import DetectionDataset
from fssd.data.transforms import eval_transform, train_transform

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
S = 48


def _write_split(root: Path, n_images: int = 6) -> Path:
    """Small images under root/raw/imgs, a split json at root/processed/train.json."""
    rng = np.random.default_rng(0)
    (root / "raw" / "imgs").mkdir(parents=True)
    (root / "processed").mkdir()
    images, annotations = [], []
    ann_id = 1
    for i in range(n_images):
        h, w = 40 + 4 * i, 60 - 2 * i
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"raw/imgs/{i:03d}.png" if i % 2 else f"raw/imgs/{i:03d}.jpg"
        assert cv2.imwrite(str(root / name), img)
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        if i == 1:
            continue  # an image without objects
        objs = [([2.0, 3.0, 20.0, 15.0], 1, 0), ([w - 10.0, h - 12.0, 10.0, 12.0], 2, 0), ([5.0, 5.0, 8.0, 8.0], 3, 1)]
        if i == 2:
            objs.append(([10.0, 10.0, 0.0, 5.0], 2, 0))  # degenerate (zero width) box in the file
        for bbox, cat, ignore in objs:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": 100 + i,
                    "category_id": cat,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                    "ignore": ignore,
                }
            )
            ann_id += 1
    cats = [{"id": k, "name": n, "supercategory": "shape"} for k, n in [(2, "cross"), (1, "circle"), (3, "star")]]
    path = root / "processed" / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


@pytest.fixture()
def split(tmp_path: Path) -> tuple[Path, Path]:
    return _write_split(tmp_path), tmp_path


def test_dataset_reads_split_and_drops_ignored(split: tuple[Path, Path]) -> None:
    ann, root = split
    ds = DetectionDataset(ann, root, eval_transform(S, MEAN, STD))
    assert len(ds) == 6 and ds.ids == [100, 101, 102, 103, 104, 105]
    assert ds.class_names == ["circle", "cross", "star"] and ds.num_classes == 4
    image, target = ds[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, S, S) and image.is_contiguous()
    assert target["image_id"] == 100 and target["orig_size"] == (40, 60)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2]  # ignore=1 dropped
    assert target["boxes"].dtype == torch.float32
    expected = torch.tensor([[2 / 60, 3 / 40, 22 / 60, 18 / 40], [50 / 60, 28 / 40, 1.0, 1.0]])
    torch.testing.assert_close(target["boxes"], expected, atol=1e-5, rtol=0)
    _, empty = ds[1]
    assert tuple(empty["boxes"].shape) == (0, 4) and tuple(empty["labels"].shape) == (0,)
    _, with_degenerate = ds[2]
    assert with_degenerate["labels"].tolist() == [1, 2]  # the zero-width box never comes out
    kept = DetectionDataset(ann, root, eval_transform(S, MEAN, STD), ignored="target")
    assert kept[0][1]["labels"].tolist() == [1, 2, 3] and not kept[0][1]["ignore"].any()
    regions = DetectionDataset(ann, root, eval_transform(S, MEAN, STD), ignored="ignore")
    assert regions[0][1]["labels"].tolist() == [1, 2, 3]
    assert regions[0][1]["ignore"].tolist() == [False, False, True]  # the difficult object: an ignore region
    with pytest.raises(ValueError, match="ignored must be one of"):
        DetectionDataset(ann, root, None, ignored="skip")


def test_dataset_without_transform_returns_uint8(split: tuple[Path, Path]) -> None:
    ann, root = split
    ds = DetectionDataset(ann, root, None)
    image, target = ds[3]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 52, 54)
    png = cv2.cvtColor(cv2.imread(str(root / "raw/imgs/003.png")), cv2.COLOR_BGR2RGB)
    assert torch.equal(image, torch.from_numpy(png).permute(2, 0, 1))  # RGB, not BGR
    assert target["labels"].tolist() == [1, 2]


def test_train_targets_valid_over_epochs(split: tuple[Path, Path]) -> None:
    ann, root = split
    ds = DetectionDataset(ann, root, train_transform(S, MEAN, STD), seed=3)
    for epoch in range(15):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, t = ds[i]
            assert tuple(image.shape) == (3, S, S)
            b = t["boxes"]
            assert b.dtype == torch.float32 and t["labels"].dtype == torch.int64
            assert len(b) == len(t["labels"])
            assert ((b >= 0) & (b <= 1)).all()
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert set(t["labels"].tolist()) <= {1, 2}


def test_same_seed_epoch_index_same_tensors(split: tuple[Path, Path]) -> None:
    ann, root = split
    a = DetectionDataset(ann, root, train_transform(S, MEAN, STD), seed=5)
    b = DetectionDataset(ann, root, train_transform(S, MEAN, STD), seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in (0, 3, 4):
        _ = b[5]  # reading other samples in between must not matter
        xa, ta = a[i]
        xb, tb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["labels"], tb["labels"])
    x0 = a[0][0]
    a.set_epoch(3)
    assert a.epoch == 3 and not torch.equal(x0, a[0][0])
    c = DetectionDataset(ann, root, train_transform(S, MEAN, STD), seed=6)
    c.set_epoch(2)
    assert not torch.equal(x0, c[0][0])
    with pytest.raises(ValueError, match="epoch"):
        a.set_epoch(-1)
    with pytest.raises(ValueError, match="seed"):
        DetectionDataset(ann, root, None, seed=-2)


def _epochs(ds: DetectionDataset, loader: DataLoader, epochs: list[int]) -> list[list[torch.Tensor]]:
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out.append([batch["images"].clone() for batch in loader])
    return out


def test_workers_do_not_change_the_stream(split: tuple[Path, Path]) -> None:
    ann, root = split
    ds = DetectionDataset(ann, root, train_transform(S, MEAN, STD), seed=1)
    kw = {"batch_size": 2, "collate_fn": detection_collate, "shuffle": False}
    ref = _epochs(ds, DataLoader(ds, num_workers=0, **kw), [0, 1])
    got = _epochs(ds, DataLoader(ds, num_workers=2, persistent_workers=True, **kw), [0, 1])
    for e in range(2):
        for x, y in zip(ref[e], got[e]):
            assert torch.equal(x, y)
    assert not torch.equal(ref[0][0], ref[1][0])  # persistent workers saw set_epoch(1)


def test_missing_and_corrupt_images_name_the_file(split: tuple[Path, Path]) -> None:
    ann, root = split
    ds = DetectionDataset(ann, root, eval_transform(S, MEAN, STD))
    (root / "raw/imgs/002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="002.jpg"):
        ds[2]
    (root / "raw/imgs/003.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="003.png"):
        ds[3]
    cv2.imwrite(str(root / "raw/imgs/004.jpg"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="004.jpg.*convert"):
        ds[4]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["categories"].pop(0), "contiguous"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
        (lambda d: d["annotations"][0].update(image_id=999), "image_id"),
        (lambda d: d["annotations"][0].update(category_id=9), "category_id"),
        (lambda d: d["images"][0].pop("width"), "width"),
    ],
)
def test_malformed_split_names_the_file(split: tuple[Path, Path], mutate, match: str) -> None:
    ann, root = split
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as info:
        DetectionDataset(ann, root, None)
    assert str(ann) in str(info.value)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        DetectionDataset(bad, tmp_path, None)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        DetectionDataset(tmp_path / "nope.json", tmp_path, None)


def _sample(n: int, image_id: int) -> tuple[torch.Tensor, dict]:
    boxes = torch.rand(n, 2) * 0.5
    boxes = torch.cat([boxes, boxes + 0.25], dim=1)
    return torch.full((3, 8, 8), float(image_id)), {
        "boxes": boxes,
        "labels": torch.arange(1, n + 1),
        "image_id": image_id,
        "orig_size": (30 + image_id, 40),
    }


def test_collate_pads_boxes_and_labels() -> None:
    batch = [_sample(2, 0), _sample(0, 1), _sample(3, 2)]
    out = detection_collate(batch)
    assert set(out) == {"images", "boxes", "labels", "ignore", "image_ids", "orig_sizes"}
    assert out["ignore"].dtype == torch.bool and not out["ignore"].any()
    assert tuple(out["images"].shape) == (3, 3, 8, 8) and out["images"].dtype == torch.float32
    assert tuple(out["boxes"].shape) == (3, 3, 4) and out["boxes"].dtype == torch.float32
    assert tuple(out["labels"].shape) == (3, 3) and out["labels"].dtype == torch.int64
    assert out["labels"].tolist() == [[1, 2, -1], [-1, -1, -1], [1, 2, 3]]
    assert torch.equal(out["boxes"][0, :2], batch[0][1]["boxes"]) and (out["boxes"][0, 2] == 0).all()
    assert (out["boxes"][1] == 0).all()
    assert out["image_ids"].dtype == torch.int64 and out["image_ids"].tolist() == [0, 1, 2]
    assert out["orig_sizes"].dtype == torch.int64 and out["orig_sizes"].tolist() == [[30, 40], [31, 40], [32, 40]]
    empty = detection_collate([_sample(0, 0), _sample(0, 1)])
    assert tuple(empty["boxes"].shape) == (2, 1, 4) and empty["labels"].tolist() == [[-1], [-1]]
    with pytest.raises(ValueError, match="one shape"):
        detection_collate([_sample(1, 0), (torch.zeros(3, 4, 4), _sample(1, 1)[1])])


@pytest.mark.slow  # a fresh interpreter importing torch, torchvision and albumentations
def test_import_boundary_data_modules() -> None:
    # fssd's own imports are checked with ast (tests/fssd/test_model.py); here: the data modules and
    # their dependencies load no framework (albumentations' own optional `import yaml` is its business)
    code = (
        "import sys, fssd.data.transforms, fssd.data.dataset, fssd.data.collate\n"
        "bad = {'ray', 'mlflow', 'dvc', 'boto3', 'botocore'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
