"""fssd.predictor: same detections as the evaluation path, boxes in each image's own pixels."""

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

from fssd import build_fssd, save_checkpoint
from fssd.data.collate import detection_collate
from fssd.data.dataset import DetectionDataset
from fssd.data.transforms import eval_transform
from fssd.engine import predict
from fssd.predictor import Predictor, decode_image, draw_detections, read_image, write_image

CLASSES = ["circle", "square", "triangle"]
SIZE = 128


def _random_checkpoint(path: Path, seed: int = 0) -> None:
    """A lite FSSD with random weights, scaled-up class logits (scores that vary from prior to prior)
    and a conf bias that favours class 1, so that there are detections."""
    torch.manual_seed(seed)
    model = build_fssd("fssd_lite", len(CLASSES) + 1, input_size=SIZE)
    with torch.no_grad():
        for head, a in zip(model.conf_head, model.prior_config.anchors_per_location):
            head.weight.mul_(100.0)
            head.bias.view(a, len(CLASSES) + 1)[:, 1] += 1.0
        for head in model.loc_head:
            head.weight.mul_(3.0)
    cfg = model.config
    from fssd.config import DetectorConfig

    save_checkpoint(path, model, DetectorConfig(model=cfg, priors=model.prior_config), CLASSES)


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cv2.rectangle(img, (w // 5, h // 4), (w // 2, h // 2), (255, 0, 0), -1)
    cv2.circle(img, (2 * w // 3, 2 * h // 3), min(h, w) // 6, (0, 255, 0), -1)
    return img


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "fssd.pt"
    _random_checkpoint(path)
    return path


def _to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def test_predictor_matches_engine_predict_on_the_dataset_path(tmp_path, checkpoint):
    sizes = [(96, 160), (240, 180), (128, 128), (75, 301), (200, 260)]
    images = []
    for i, (h, w) in enumerate(sizes):
        img = _scene(h, w, i)
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": w, "height": h})
    split = {"images": images, "annotations": [],
             "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASSES)]}
    (tmp_path / "test.json").write_text(json.dumps(split))

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=2)
    model = predictor.model
    ds = DetectionDataset(tmp_path / "test.json", tmp_path,
                          eval_transform(SIZE, model.config.image_mean, model.config.image_std), ignored="target")
    loader = DataLoader(ds, batch_size=2, collate_fn=detection_collate)
    reference = predict(model, loader, device=torch.device("cpu"), category_ids=[1, 2, 3])
    assert reference, "the biased random model must produce detections"

    pixels = [read_image(tmp_path / f"{i}.png") for i in range(len(sizes))]
    ours = predictor.predict(pixels)
    assert len(ours) == len(sizes)
    for i, det in enumerate(ours):
        ref = [r for r in reference if r["image_id"] == 10 + i]
        assert len(det["boxes"]) == len(ref) > 0
        np.testing.assert_allclose(_to_xywh(det["boxes"]), [r["bbox"] for r in ref], atol=2e-3)
        np.testing.assert_allclose(det["scores"], [r["score"] for r in ref], atol=1e-5)
        assert det["labels"].tolist() == [r["category_id"] for r in ref]
        assert det["names"] == [CLASSES[k - 1] for k in det["labels"]]
        assert det["boxes"].dtype == np.float32 and det["labels"].dtype == np.int64
        assert (np.diff(det["scores"]) <= 0).all()

    # another batch split: the same best detection per image (lower ranks may swap near-equal scores)
    for a, b in zip(ours, predictor.predict(pixels, batch_size=1)):
        np.testing.assert_allclose(a["boxes"][0], b["boxes"][0], atol=1e-2)
        np.testing.assert_allclose(a["scores"][0], b["scores"][0], atol=1e-5)


def test_boxes_are_in_each_images_own_pixels(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", max_detections=50)
    base = _scene(SIZE, SIZE, 7)
    # nearest upscaling by whole factors: the linear resize back to SIZE gives the same network input
    big = cv2.resize(base, (SIZE * 3, SIZE * 2), interpolation=cv2.INTER_NEAREST)
    a, b = predictor.predict([base, big])
    assert len(a["boxes"]) > 0
    assert len(a["boxes"]) == len(b["boxes"])
    np.testing.assert_allclose(b["scores"], a["scores"], atol=1e-5)
    np.testing.assert_allclose(b["boxes"], a["boxes"] * np.array([3, 2, 3, 2], dtype=np.float32), rtol=1e-4, atol=1e-2)
    # the score threshold holds, and a per-call override tightens it
    assert (a["scores"] > predictor.score_threshold).all()
    t = float(np.median(a["scores"]))
    strict = predictor.predict([base], score_threshold=t)[0]
    assert (strict["scores"] > t).all() and 0 < len(strict["scores"]) < len(a["scores"])


def test_channels_last_on_cpu_gives_the_same_detections(checkpoint):
    """channels_last is used on CPU too (oneDNN is faster with it); the numbers do not change."""
    plain = Predictor.from_checkpoint(checkpoint, device="cpu", channels_last=False)
    fast = Predictor.from_checkpoint(checkpoint, device="cpu", channels_last=True)
    assert fast.channels_last
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = [_scene(120, 150, 5), _scene(90, 90, 6)]
    for a, b in zip(plain.predict(images), fast.predict(images)):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        np.testing.assert_allclose(a["scores"][:10], b["scores"][:10], atol=1e-4)
        np.testing.assert_allclose(a["boxes"][:10], b["boxes"][:10], atol=1e-2)


def test_checkpoint_postprocess_defaults_and_overrides(checkpoint):
    p = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert (p.score_threshold, p.nms_threshold, p.max_detections) == (0.01, 0.45, 200)
    q = Predictor.from_checkpoint(checkpoint, device="cpu", score_threshold=0.3, max_detections=5, batch_size=4)
    assert (q.score_threshold, q.max_detections, q.batch_size) == (0.3, 5, 4)
    assert q.amp_dtype is None  # CPU: no autocast
    det = q.predict([_scene(100, 90, 3)])[0]
    assert len(det["scores"]) <= 5 and (det["scores"] > 0.3).all()


def test_input_errors_name_the_problem(tmp_path, checkpoint):
    p = Predictor.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="image 1 must have dtype uint8"):
        p.predict([_scene(50, 50, 0), np.zeros((50, 50, 3), np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        p.predict([np.zeros((50, 50, 2), np.uint8)])
    with pytest.raises(ValueError, match="list of images"):
        p.predict(_scene(50, 50, 0))
    # grey and RGBA are accepted
    assert len(p.predict([np.zeros((40, 60), np.uint8), np.zeros((40, 60, 4), np.uint8)])) == 2
    assert p.predict([]) == []
    with pytest.raises(ValueError, match="class names"):
        Predictor(build_fssd("fssd_lite", 3, input_size=SIZE), ["only-one"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg cannot be decoded"):
        read_image(bad)
    with pytest.raises(ValueError, match="missing.jpg does not exist"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="does not exist"):
        Predictor.from_checkpoint(tmp_path / "nope.pt")


def test_draw_and_write_round_trip(tmp_path, checkpoint):
    p = Predictor.from_checkpoint(checkpoint, device="cpu")
    img = _scene(120, 160, 1)
    det = p.predict([img])[0]
    drawn = draw_detections(img, det, score_threshold=0.0)
    assert drawn.shape == img.shape and not np.array_equal(drawn, img)
    assert np.array_equal(draw_detections(img, det, score_threshold=1.1), img)
    write_image(tmp_path / "out.png", drawn)
    assert np.array_equal(read_image(tmp_path / "out.png"), drawn)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert np.array_equal(decode_image(buf.tobytes()), img)


def test_predictor_imports_no_framework():
    code = (
        "import sys, fssd.predictor\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'dvc', 'boto3', 'botocore', 'yaml'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import fssd.predictor loaded {out.stdout.strip()}"
