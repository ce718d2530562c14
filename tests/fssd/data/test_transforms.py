"""SSD augmentation (fssd.data.transforms): box validity, the min-IoU crop, zoom-out, seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fssd.data.transforms import (  # first: fssd imports albumentations its own way (no yaml)
    SSD_CROP_MODES,
    MinIoURandomCrop,
    ZoomOut,
    eval_transform,
    reseed,
    train_transform,
)

import albumentations as A  # noqa: E402  (after fssd.data.transforms on purpose)

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
S = 64  # small input size keeps the tests fast


def _assert_valid(out: dict, size: int, n_in: int, min_box_size: float = 1.0) -> None:
    img = out["image"]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
    assert tuple(img.shape) == (3, size, size)
    assert torch.isfinite(img).all()
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"]).reshape(-1)
    assert len(boxes) == len(labels) <= n_in
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((boxes[:, 2] - boxes[:, 0]) * size >= min_box_size - 1e-3).all()
    assert ((boxes[:, 3] - boxes[:, 1]) * size >= min_box_size - 1e-3).all()


ADVERSARIAL = {
    # tiny boxes (1 px and sub-pixel), boxes touching every border, a full-image box
    "tiny_and_borders": (
        np.array(
            [
                [0.0, 0.0, 1 / 80, 1 / 60],
                [0.5, 0.5, 0.5 + 0.2 / 80, 0.5 + 0.2 / 60],
                [0.9, 0.0, 1.0, 0.1],
                [0.0, 0.9, 0.1, 1.0],
                [0.95, 0.95, 1.0, 1.0],
                [0.0, 0.0, 1.0, 1.0],
            ],
            dtype=np.float32,
        ),
        np.array([1, 2, 3, 4, 5, 6]),
    ),
    "no_objects": (np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.int64)),
    "thin_boxes": (
        np.array([[0.1, 0.2, 0.9, 0.2 + 1 / 60], [0.4, 0.0, 0.4 + 1 / 80, 1.0]], dtype=np.float32),
        np.array([7, 8]),
    ),
    "many_overlapping": (
        np.array([[0.1 + 0.01 * i, 0.1, 0.5 + 0.01 * i, 0.6] for i in range(30)], dtype=np.float32),
        np.arange(1, 31),
    ),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_train_outputs_always_valid(case: str) -> None:
    boxes, labels = ADVERSARIAL[case]
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    t = train_transform(S, MEAN, STD)
    for seed in range(150):
        reseed(t, 1, 0, seed)
        out = t(image=image, bboxes=boxes.copy(), labels=labels.copy())
        _assert_valid(out, S, len(boxes))
        assert set(np.asarray(out["labels"]).tolist()) <= set(labels.tolist())


def test_out_of_range_input_boxes_are_clipped() -> None:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    boxes = np.array([[-0.2, -0.1, 0.5, 0.5], [0.5, 0.5, 1.3, 1.0]], dtype=np.float32)
    out = eval_transform(S, MEAN, STD)(image=image, bboxes=boxes, labels=np.array([1, 2]))
    np.testing.assert_allclose(np.asarray(out["bboxes"]), [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], atol=1e-6)


# Solid, well separated objects, each coloured by its label: after augmentation the pixel at the
# centre of every output box must still have its label's colour (labels follow their boxes).
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}


def _coloured_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = 120, 160
    image = np.full((h, w, 3), 20, dtype=np.uint8)
    px = np.array([[5, 5, 60, 50], [90, 10, 155, 70], [10, 70, 70, 115], [100, 85, 150, 118]], dtype=np.float32)
    for (x1, y1, x2, y2), k in zip(px.astype(int), COLOURS):
        image[y1:y2, x1:x2] = COLOURS[k]
    return image, px / np.array([w, h, w, h], dtype=np.float32), np.array(list(COLOURS))


def test_labels_follow_boxes_through_geometry() -> None:
    image, boxes, labels = _coloured_scene()
    t = train_transform(S, MEAN, STD, photometric=False)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    checked = 0
    for seed in range(60):
        reseed(t, 2, 0, seed)
        out = t(image=image, bboxes=boxes.copy(), labels=labels.copy())
        rgb = out["image"] * std + mean
        for (x1, y1, x2, y2), k in zip(np.asarray(out["bboxes"]) * S, np.asarray(out["labels"])):
            if x2 - x1 < 6 or y2 - y1 < 6:
                continue
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            colour = rgb[:, cy, cx].numpy()
            assert np.abs(colour - np.array(COLOURS[int(k)])).max() < 40, (seed, k, colour)
            checked += 1
    assert checked > 60


def test_min_iou_crop_apply_with_fixed_params() -> None:
    crop = MinIoURandomCrop()
    h, w = 100, 200
    # pixel boxes; the 3rd has its centre outside the crop, the 4th straddles the crop border
    px = np.array([[20, 20, 60, 60], [100, 40, 140, 90], [150, 0, 200, 30], [0, 50, 50, 70]], dtype=np.float64)
    norm = px / np.array([w, h, w, h])
    with_labels = np.concatenate([norm, np.array([[11], [12], [13], [14]])], axis=1).astype(np.float32)
    coords = (10, 10, 130, 80)
    out = crop.apply_to_bboxes(with_labels, crop_coords=coords, shape=(h, w, 3))
    assert out[:, 4].tolist() == [11, 12, 14]  # label column rides along; box 13 dropped
    expected = np.array([[20, 20, 60, 60], [100, 40, 130, 80], [10, 50, 50, 70]], dtype=np.float64)
    expected -= np.array([10, 10, 10, 10])
    expected /= np.array([120, 70, 120, 70])
    np.testing.assert_allclose(out[:, :4], expected, atol=1e-6)
    img = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    np.testing.assert_array_equal(crop.apply(img, crop_coords=coords), img[10:80, 10:130])
    # the whole-image crop is the identity
    assert crop.apply(img, crop_coords=(0, 0, w, h)) is img
    assert crop.apply_to_bboxes(with_labels, crop_coords=(0, 0, w, h), shape=(h, w, 3)) is with_labels


def _iou(boxes: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    ix = np.clip(np.minimum(boxes[:, 2], rect[2]) - np.maximum(boxes[:, 0], rect[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], rect[3]) - np.maximum(boxes[:, 1], rect[1]), 0, None)
    inter = ix * iy
    a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (a + (rect[2] - rect[0]) * (rect[3] - rect[1]) - inter)


@pytest.mark.parametrize("min_iou", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
def test_min_iou_crop_respects_constraint(min_iou: float) -> None:
    h, w = 300, 400
    px = np.array([[30, 40, 250, 280], [200, 20, 390, 140], [10, 200, 60, 290]], dtype=np.float64)
    norm = px / np.array([w, h, w, h])
    crop = MinIoURandomCrop(modes=(min_iou,))
    whole, n = 0, 100
    for seed in range(n):
        crop.set_random_state(np.random.default_rng(seed), random.Random(seed))
        rect = crop.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": norm})["crop_coords"]
        if rect == (0, 0, w, h):
            whole += 1
            continue
        cw, ch = rect[2] - rect[0], rect[3] - rect[1]
        assert 0.3 * w - 1 <= cw <= w and 0.3 * h - 1 <= ch <= h
        assert 0.5 - 0.05 <= ch / cw <= 2.0 + 0.05
        cx, cy = (px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2
        inside = (cx > rect[0]) & (cx < rect[2]) & (cy > rect[1]) & (cy < rect[3])
        assert inside.any()
        assert _iou(px[inside], rect).max() >= min_iou
    assert whole < n  # the sampler does find crops for every mode here


def test_min_iou_crop_unsatisfiable_falls_back_to_whole_image() -> None:
    h, w = 100, 100
    norm = np.array([[0.1, 0.1, 0.12, 0.12]])  # IoU <= 0.0045 with any allowed crop
    crop = MinIoURandomCrop(modes=(0.5,), max_trials=5)
    crop.set_random_state(np.random.default_rng(0), random.Random(0))
    assert crop.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": norm})["crop_coords"] == (0, 0, w, h)


def test_min_iou_crop_modes_and_no_boxes() -> None:
    h, w = 50, 80
    keep = MinIoURandomCrop(modes=(None,))
    assert keep.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": np.zeros((0, 4))})["crop_coords"] == (
        0,
        0,
        w,
        h,
    )
    crop = MinIoURandomCrop(modes=(0.7,))
    seen_crop = False
    for seed in range(20):
        crop.set_random_state(np.random.default_rng(seed), random.Random(seed))
        rect = crop.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": np.zeros((0, 4))})["crop_coords"]
        seen_crop |= rect != (0, 0, w, h)
        assert 0 <= rect[0] < rect[2] <= w and 0 <= rect[1] < rect[3] <= h
    assert seen_crop
    assert SSD_CROP_MODES == (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)
    with pytest.raises(ValueError, match="modes"):
        MinIoURandomCrop(modes=(1.5,))
    with pytest.raises(ValueError, match="min_scale"):
        MinIoURandomCrop(min_scale=0.0)


def test_zoom_out_fills_with_mean_and_moves_boxes() -> None:
    rng = np.random.default_rng(3)
    h, w = 30, 40
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = np.array([[0.25, 0.2, 0.75, 0.9]], dtype=np.float32)
    t = A.Compose(
        [ZoomOut(max_ratio=4.0, fill=MEAN, p=1.0)],
        bbox_params=A.BboxParams(format="albumentations", label_fields=["labels"]),
    )
    fill = np.round(np.array(MEAN)).astype(np.uint8)
    sizes = set()
    for seed in range(30):
        reseed(t, seed)
        out = t(image=image, bboxes=boxes, labels=np.array([5]))
        canvas = out["image"]
        ch, cw = canvas.shape[:2]
        assert h <= ch <= 4 * h and w <= cw <= 4 * w
        sizes.add((ch, cw))
        params = t.transforms[0].params
        top, left = params["pad_top"], params["pad_left"]
        np.testing.assert_array_equal(canvas[top : top + h, left : left + w], image)
        mask = np.ones((ch, cw), dtype=bool)
        mask[top : top + h, left : left + w] = False
        assert (canvas[mask] == fill).all()
        expected = (boxes[0] * [w, h, w, h] + [left, top, left, top]) / [cw, ch, cw, ch]
        np.testing.assert_allclose(np.asarray(out["bboxes"])[0], expected, atol=1e-5)
        assert np.asarray(out["labels"]).tolist() == [5]
    assert len(sizes) > 10
    with pytest.raises(ValueError, match="max_ratio"):
        ZoomOut(max_ratio=0.5)


def test_train_zoom_out_canvas_is_mean_after_normalisation() -> None:
    # crop-free, flip-free train pipeline on a black image: the canvas normalises to ~0
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    black = -torch.tensor(MEAN).view(3, 1, 1) / torch.tensor(STD).view(3, 1, 1)
    t = train_transform(S, MEAN, STD, photometric=False, p_expand=1.0, crop_modes=(None,), p_flip=0.0)
    for seed in range(5):
        reseed(t, seed)
        out = t(image=image, bboxes=np.zeros((0, 4), dtype=np.float32), labels=np.zeros((0,), dtype=np.int64))
        img = out["image"]
        is_canvas = (img.abs() < 0.01).all(0)
        is_image = ((img - black).abs() < 0.01).all(0)
        pads = t.transforms[0].params
        assert is_image.any()
        if min(pads["pad_top"] + pads["pad_bottom"], pads["pad_left"] + pads["pad_right"]) >= 4:
            assert is_canvas.any()
        assert (is_canvas | is_image).float().mean() > 0.8  # the rest is the resize's blend


def test_reseed_reproducible_and_epoch_dependent() -> None:
    image, boxes, labels = _coloured_scene()
    t = train_transform(S, MEAN, STD)
    t2 = train_transform(S, MEAN, STD)

    def run(tr, *keys):
        reseed(tr, *keys)
        return tr(image=image, bboxes=boxes.copy(), labels=labels.copy())

    a, b = run(t, 0, 1, 7), run(t2, 0, 1, 7)
    assert torch.equal(a["image"], b["image"])
    np.testing.assert_array_equal(np.asarray(a["bboxes"]), np.asarray(b["bboxes"]))
    np.testing.assert_array_equal(np.asarray(a["labels"]), np.asarray(b["labels"]))
    different = sum(not torch.equal(run(t, 0, 1, 7)["image"], run(t, 0, e, 7)["image"]) for e in range(2, 7))
    assert different == 5
    with pytest.raises(ValueError):
        reseed(t)
    with pytest.raises(ValueError):
        reseed(t, -1)


def test_reseed_gives_independent_decisions() -> None:
    # albumentations' Compose(seed=s) seeds every transform with the same s, so two p=0.5 flips
    # always agree; reseed shares one generator, so they agree about half of the time.
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    t = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    agree = 0
    for seed in range(200):
        reseed(t, seed)
        t(image=image)
        agree += bool(t.transforms[0].params) == bool(t.transforms[1].params)
    assert 60 < agree < 140


def test_eval_transform_deterministic_and_normalises() -> None:
    image = np.empty((30, 50, 3), dtype=np.uint8)
    image[:] = np.round(MEAN).astype(np.uint8)
    image[:, 25:] = (255, 0, 10)
    boxes = np.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    t = eval_transform(S, MEAN, STD)
    a = t(image=image, bboxes=boxes, labels=np.array([1, 2]))
    b = t(image=image, bboxes=boxes, labels=np.array([1, 2]))
    assert torch.equal(a["image"], b["image"]) and tuple(a["image"].shape) == (3, S, S)
    np.testing.assert_allclose(np.asarray(a["bboxes"]), boxes, atol=1e-6)
    assert np.asarray(a["labels"]).tolist() == [1, 2]
    expected_right = (torch.tensor([255.0, 0.0, 10.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(a["image"][:, 10, -1], expected_right, atol=1e-4, rtol=0)
    assert a["image"][:, 10, 0].abs().max() < 0.01
    # a train pipeline with every random step off is the eval transform
    t_off = train_transform(S, MEAN, STD, photometric=False, p_expand=0.0, crop_modes=(None,), p_flip=0.0)
    reseed(t_off, 0)
    c = t_off(image=image, bboxes=boxes, labels=np.array([1, 2]))
    assert torch.equal(a["image"], c["image"])


def test_factory_argument_errors() -> None:
    with pytest.raises(ValueError, match="input_size"):
        train_transform(0, MEAN, STD)
    with pytest.raises(ValueError, match="mean and std"):
        eval_transform(S, (1.0, 2.0), STD)
    with pytest.raises(ValueError, match="std"):
        train_transform(S, MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="min_box_size"):
        train_transform(S, MEAN, STD, min_box_size=0.0)
    with pytest.raises(ValueError, match="expand_max_ratio"):
        train_transform(S, MEAN, STD, expand_max_ratio=0.5)
