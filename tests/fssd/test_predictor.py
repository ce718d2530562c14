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


def _as_detections(records: list[dict]) -> dict:
    """COCO results records of one image as a detections dict (boxes back to x1, y1, x2, y2)."""
    xywh = np.array([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4)
    return {"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            "scores": [r["score"] for r in records], "labels": [r["category_id"] for r in records]}


def test_predictor_matches_engine_predict_on_the_dataset_path(tmp_path, checkpoint, same_detections):
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
        # the reference rounds boxes to 1e-3 px and scores to 1e-5; compared as sets, not by rank
        same_detections(det, _as_detections(ref), score_atol=1e-5, box_atol=3e-3, what=f"image {i}")
        assert det["names"] == [CLASSES[k - 1] for k in det["labels"]]
        assert det["boxes"].dtype == np.float32 and det["labels"].dtype == np.int64
        assert (np.diff(det["scores"]) <= 0).all()

    # another batch split: the same detections per image. The conv kernels differ with the batch
    # shape, so scores move by ~1e-6 and near-equal ones may swap ranks (or, once in a while,
    # which of two overlapping near-equal boxes NMS keeps): compared as sets, with that allowance
    for i, (a, b) in enumerate(zip(ours, predictor.predict(pixels, batch_size=1))):
        assert same_detections(b, a, score_atol=1e-4, rivals=2, what=f"image {i}, batch 1 vs 2") >= 0.95 * len(a["scores"])


def test_boxes_are_in_each_images_own_pixels(checkpoint, same_detections):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", max_detections=50)
    base = _scene(SIZE, SIZE, 7)
    # nearest upscaling by whole factors: the linear resize back to SIZE gives the same network input
    big = cv2.resize(base, (SIZE * 3, SIZE * 2), interpolation=cv2.INTER_NEAREST)
    a, b = predictor.predict([base, big])
    assert len(a["boxes"]) > 0
    assert len(a["boxes"]) == len(b["boxes"])
    scaled = {**a, "boxes": a["boxes"] * np.array([3, 2, 3, 2], dtype=np.float32)}
    assert same_detections(b, scaled, score_atol=1e-5, box_atol=0.05, rivals=2) >= 0.95 * len(a["scores"])
    # the score threshold holds, and a per-call override tightens it
    assert (a["scores"] > predictor.score_threshold).all()
    t = float(np.median(a["scores"]))
    strict = predictor.predict([base], score_threshold=t)[0]
    assert (strict["scores"] > t).all() and 0 < len(strict["scores"]) < len(a["scores"])


def test_channels_last_on_cpu_gives_the_same_detections(checkpoint, same_detections):
    """channels_last is used on CPU too (oneDNN is faster with it); the numbers do not change."""
    plain = Predictor.from_checkpoint(checkpoint, device="cpu", channels_last=False)
    fast = Predictor.from_checkpoint(checkpoint, device="cpu", channels_last=True)
    assert fast.channels_last
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = [_scene(120, 150, 5), _scene(90, 90, 6)]
    for a, b in zip(plain.predict(images), fast.predict(images)):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        # other kernels, scores ~1e-6 apart: the same set, near-equal scores may swap ranks
        assert same_detections(b, a, score_atol=1e-4, rivals=2) >= 0.95 * len(a["scores"])


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
    # fssd's own imports are checked with ast (test_model.py); albumentations may load yaml itself
    code = (
        "import sys, fssd.predictor\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'dvc', 'boto3', 'botocore'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import fssd.predictor loaded {out.stdout.strip()}"


# ----------------------------------------------------------------------------------------------
# oracle: perfect localisation and confidences through the Predictor give mAP 1.0

# (h, w) far from square both ways, so an x/y or h/w swap in the scaling back moves every box
ORACLE_SIZES = [(120, 300), (260, 90), (150, 200), (64, 400)]
ORACLE_CATEGORY_IDS = [4, 7, 9]  # not 1..3: a label/category-id mix-up shows too
# per image: (label 1..3, [x, y, w, h] in pixels); boxes of one class overlap by IoU < 0.45
ORACLE_BOXES = [
    [(1, [10.0, 12.0, 60.0, 50.0]), (1, [180.0, 20.0, 90.0, 80.0]), (2, [100.0, 30.0, 40.0, 85.0]),
     (3, [20.0, 70.0, 250.0, 40.0])],
    [(2, [5.0, 10.0, 70.0, 60.0]), (2, [15.0, 150.0, 50.0, 95.0]), (3, [40.0, 90.0, 45.0, 40.0])],
    [(3, [30.0, 25.0, 120.0, 90.0]), (1, [150.0, 100.0, 45.0, 45.0]), (1, [8.0, 110.0, 30.0, 35.0]),
     (2, [60.0, 5.0, 40.0, 30.0])],
    [(1, [12.0, 4.0, 90.0, 55.0]), (3, [300.0, 10.0, 80.0, 40.0]), (2, [150.0, 20.0, 60.0, 30.0])],
]


class _OracleNet(torch.nn.Module):
    """An FSSD stand-in whose outputs are the encoded ground truth of whichever image it is shown.

    Each oracle image is one flat grey level; the network input of image ``i`` is recognised by
    its mean, and the network returns ``loc`` = the SSD encoding of that image's ground truth at
    every prior (``fssd.boxes.match``, as in training) and ``conf`` = a confident one-hot logit on
    the matched class (background elsewhere). Decoding and scaling back must then give the
    ground-truth boxes in each image's own pixels.
    """

    def __init__(self, base, keys: torch.Tensor, loc: torch.Tensor, conf: torch.Tensor) -> None:
        super().__init__()
        self.config, self.prior_config = base.config, base.prior_config
        self.register_buffer("priors", base.priors.clone())
        self.register_buffer("keys", keys)
        self.register_buffer("loc", loc)
        self.register_buffer("conf", conf)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor):
        s = self.config.input_size
        assert x.shape[1:] == (3, s, s), f"network input must be [N, 3, {s}, {s}], got {tuple(x.shape)}"
        idx = (x[:, 0].mean(dim=(1, 2))[:, None] - self.keys[None]).abs().argmin(dim=1)
        self.seen.append(tuple(idx.tolist()))
        return self.loc[idx], self.conf[idx]


def _oracle():
    from fssd.boxes import match

    base = build_fssd("fssd_lite", len(CLASSES) + 1, input_size=SIZE)
    transform = eval_transform(SIZE, base.config.image_mean, base.config.image_std)
    images, keys, locs, confs = [], [], [], []
    gt = {"images": [], "annotations": [],
          "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(ORACLE_CATEGORY_IDS, CLASSES)]}
    for i, ((h, w), objects) in enumerate(zip(ORACLE_SIZES, ORACLE_BOXES)):
        image = np.full((h, w, 3), 40 + 50 * i, dtype=np.uint8)
        images.append(image)
        keys.append(float(transform(image=image, bboxes=np.zeros((0, 4)), labels=np.zeros((0,), np.int64))["image"][0].mean()))
        gt["images"].append({"id": 100 + i, "file_name": f"{i}.png", "width": w, "height": h})
        norm = []
        for label, (x, y, bw, bh) in objects:
            assert x + bw <= w and y + bh <= h, "oracle boxes lie inside their image"
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 100 + i,
                                      "category_id": ORACLE_CATEGORY_IDS[label - 1], "bbox": [x, y, bw, bh],
                                      "area": bw * bh, "iscrowd": 0})
            norm.append([x / w, y / h, (x + bw) / w, (y + bh) / h])
        labels = torch.tensor([[label for label, _ in objects]])
        loc_t, conf_t = match(torch.tensor([norm], dtype=torch.float32), labels, base.priors, 0.5,
                              base.prior_config.variances)
        conf = torch.zeros(base.priors.shape[0], len(CLASSES) + 1)
        conf[torch.arange(conf.shape[0]), conf_t[0]] = 12.0  # background, or the matched class
        locs.append(loc_t[0])
        confs.append(conf)
    net = _OracleNet(base, torch.tensor(keys), torch.stack(locs), torch.stack(confs))
    return net, images, gt


def _coco_results(dets: list[dict], image_ids: list[int]) -> list[dict]:
    return [{"image_id": image_id, "category_id": ORACLE_CATEGORY_IDS[int(k) - 1], "bbox": [float(v) for v in box],
             "score": float(s)}
            for image_id, det in zip(image_ids, dets)
            for box, s, k in zip(_to_xywh(det["boxes"]), det["scores"], det["labels"])]


@pytest.mark.parametrize("batch_size", [3, 1])
def test_oracle_outputs_through_the_predictor_give_map_one(batch_size, same_detections):
    from fssd.evaluation import voc_map

    net, images, gt = _oracle()
    predictor = Predictor(net, CLASSES, device="cpu", batch_size=batch_size)
    dets = predictor.predict(images)
    # batches of mixed sizes really went through (3 + 1 images, or one at a time), in order
    assert net.seen == ([(0, 1, 2), (3,)] if batch_size == 3 else [(0,), (1,), (2,), (3,)])
    image_ids = [im["id"] for im in gt["images"]]
    results = _coco_results(dets, image_ids)
    assert len(results) == len(gt["annotations"]), "one detection per object: duplicates are suppressed, nothing else scores"
    for i, det in enumerate(dets):
        truth = [a for a in gt["annotations"] if a["image_id"] == image_ids[i]]
        xywh = np.array([a["bbox"] for a in truth])
        expected = {"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                    "scores": det["scores"].max() * np.ones(len(truth)),
                    "labels": [ORACLE_CATEGORY_IDS.index(a["category_id"]) + 1 for a in truth]}
        same_detections(det, expected, score_atol=1e-6, box_atol=0.01, what=f"oracle image {i} {ORACLE_SIZES[i]}")
    for metric in (True, False):
        for iou in (0.5, 0.95):
            res = voc_map(gt, results, iou_threshold=iou, use_07_metric=metric)
            assert res.map == pytest.approx(1.0, abs=1e-6), (metric, iou, res.ap)
            assert all(a == pytest.approx(1.0, abs=1e-6) for a in res.ap.values())


def test_oracle_catches_a_height_width_swap():
    """The oracle is sharp: scaling back with (w, h) instead of (h, w) loses most of the mAP."""
    from fssd.evaluation import voc_map

    net, images, gt = _oracle()
    predictor = Predictor(net, CLASSES, device="cpu", batch_size=4)
    batch, sizes = predictor.preprocess(images)
    swapped = predictor.predict_batch(batch, [(w, h) for h, w in sizes])
    res = voc_map(gt, _coco_results(swapped, [im["id"] for im in gt["images"]]), iou_threshold=0.5)
    assert res.map < 0.5


# ----------------------------------------------------------------------------------------------
# post-processing is deterministic: equal scores resolved by prior order, images independent


def test_equal_scores_are_ordered_by_prior_and_nms_keeps_the_first():
    from fssd.boxes import encode
    from fssd.postprocess import postprocess

    # 8 priors on a row; prior 7 is given the box of prior 6 (a duplicate with the same score)
    cx = torch.arange(8, dtype=torch.float32) / 8 + 1 / 16
    priors = torch.stack([cx, torch.full_like(cx, 0.5), torch.full_like(cx, 0.1), torch.full_like(cx, 0.1)], dim=1)
    boxes = torch.stack([cx - 0.04, torch.full_like(cx, 0.46), cx + 0.04, torch.full_like(cx, 0.54)], dim=1)
    boxes[7] = boxes[6]
    loc = encode(boxes, priors, (0.1, 0.2))[None]
    logits = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 0.5, 1.5, 1.5])  # ties: {1, 3}, {0, 2, 4}, {6, 7}
    conf = torch.stack([torch.zeros(8), logits, torch.full((8,), -20.0)], dim=1)[None]
    for _ in range(3):
        det = postprocess(loc, conf, priors, image_sizes=[(100, 100)], score_threshold=0.3)[0]
        order = torch.round((det["boxes"][:, 0] + det["boxes"][:, 2]) / 2 / 100 * 8 - 0.5).long().tolist()
        assert order == [1, 3, 6, 0, 2, 4, 5]  # descending score, equal scores in prior order; 7 suppressed by 6


def test_an_image_is_not_suppressed_by_another_images_boxes_off_the_top_left():
    """batched_nms separates groups by offsets that assume coordinates >= 0; unclipped boxes
    hanging off the top-left of one image must not suppress another image's (or class's) boxes."""
    from fssd.boxes import encode
    from fssd.postprocess import postprocess

    priors = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    sizes = [(140, 140), (140, 140)]
    loc = torch.stack([encode(torch.tensor([[41.0, 41.0, 140.0, 140.0]]) / 140, priors, (0.1, 0.2)),
                       encode(torch.tensor([[-100.0, -100.0, 10.0, 10.0]]) / 140, priors, (0.1, 0.2))])
    conf = torch.tensor([[[0.0, -10.0, 0.0]], [[0.0, 3.0, -10.0]]])  # image 0: class 2 at 0.5; image 1: class 1 at 0.95
    batched = postprocess(loc, conf, priors, image_sizes=sizes, score_threshold=0.3)
    alone = postprocess(loc[:1], conf[:1], priors, image_sizes=sizes[:1], score_threshold=0.3)[0]
    assert len(alone["boxes"]) == 1
    torch.testing.assert_close(batched[0]["boxes"], alone["boxes"])
    # and across classes of one image
    one = postprocess(torch.cat([loc[0], loc[1]])[None], torch.cat([conf[0], conf[1]])[None],
                      torch.cat([priors, priors]), image_sizes=sizes[:1], score_threshold=0.3)[0]
    assert sorted(one["labels"].tolist()) == [1, 2]
