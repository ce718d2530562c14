"""SSD data augmentation built on albumentations 2.x.

The training pipeline follows the SSD recipe (Liu et al. 2016, and the ``augmentations.py`` of
ssd.pytorch that FSSD's code descends from), in this order:

1. photometric distortion: random brightness, then contrast / saturation / hue with contrast
   either first or last (:func:`ssd_photometric_distort`);
2. zoom-out ("expand"): the image placed at a random spot of a canvas up to ``expand_max_ratio``
   times larger, filled with the mean pixel (:class:`ZoomOut`);
3. the SSD min-IoU random crop (:class:`MinIoURandomCrop`);
4. horizontal flip;
5. resize to the square network input, normalisation ``(rgb_0_255 - mean) / std`` and a CHW
   ``float32`` tensor.

Boxes travel in the albumentations format (normalised ``x1, y1, x2, y2`` in ``[0, 1]``) with a
``labels`` field: call a transform built here as
``transform(image=rgb_uint8_hwc, bboxes=boxes_n4, labels=labels_n)``. Every box that comes out
is inside ``[0, 1]``, has ``x2 > x1`` and ``y2 > y1`` and is at least ``min_box_size`` pixels wide
and high at the network input size; each label follows its box.

Randomness: albumentations 2 gives every transform its own ``random.Random`` / numpy
``Generator``. ``Compose(seed=s)`` (and ``set_random_seed``) seeds *each* transform with the same
``s``, so their streams are identical and their decisions correlated (two ``p=0.5`` flips always
agree). :func:`reseed` instead hands one shared pair of generators, derived from any integers
(``seed, epoch, index``), to the whole tree with ``set_random_state``; the dataset calls it for
every sample.
"""

from __future__ import annotations

import numbers
import os
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

# albumentations 2 asks PyPI for a newer version at import (2 s timeout, a warning when offline)
# unless NO_ALBUMENTATIONS_UPDATE is set; a library that DataLoader and Ray workers import must not.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402  (after the variable above)
from albumentations.pytorch import ToTensorV2  # noqa: E402

__all__ = [
    "SSD_CROP_MODES",
    "MinIoURandomCrop",
    "ZoomOut",
    "eval_transform",
    "reseed",
    "ssd_photometric_distort",
    "train_transform",
]

#: The SSD crop sampler's modes: ``None`` keeps the whole image; a number is the minimum IoU that
#: at least one kept box must have with the crop (``0.0`` = no IoU constraint).
SSD_CROP_MODES: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)

_MAX_MODE_DRAWS = 100  # bound on the sampler's outer loop; falls back to the whole image


def reseed(transform: A.BasicTransform | A.BaseCompose, *keys: int) -> None:
    """Give ``transform`` (a ``Compose`` or single transform) fresh random state from ``keys``.

    One numpy ``Generator`` and one ``random.Random``, both derived from
    ``numpy.random.SeedSequence(keys)``, are shared by every transform in the tree, so the same
    keys give the same augmentation and the transforms' draws are independent of each other.
    ``keys`` are non-negative integers, e.g. ``(seed, epoch, index)``.
    """
    if not keys:
        raise ValueError("reseed needs at least one integer key, e.g. reseed(t, seed, epoch, index)")
    try:
        seq = np.random.SeedSequence([int(k) for k in keys])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reseed keys must be non-negative integers, got {keys!r}") from exc
    np_state, py_state = seq.spawn(2)
    py_seed = int.from_bytes(py_state.generate_state(4, np.uint32).tobytes(), "little")
    transform.set_random_state(np.random.default_rng(np_state), random.Random(py_seed))


def _check_fill(fill: Sequence[float] | float, name: str) -> tuple[float, ...] | float:
    if isinstance(fill, numbers.Real):
        return float(fill)
    values = tuple(float(v) for v in fill)
    if not 1 <= len(values) <= 4:
        raise ValueError(f"{name} must be a number or 1-4 per-channel values, got {fill!r}")
    return values


class ZoomOut(A.Pad):
    """SSD's "expand": put the image on a larger canvas filled with ``fill``.

    A ratio ``r ~ U(1, max_ratio)`` gives a canvas of ``int(h * r) x int(w * r)``; the image goes
    to ``(int(left), int(top))`` with ``left ~ U(0, w*r - w)``, ``top ~ U(0, h*r - h)``, exactly
    as ssd.pytorch's ``Expand``. Padding, boxes, masks and keypoints are handled by
    :class:`albumentations.Pad`; this class only draws the per-call padding.

    Args:
        max_ratio: largest canvas side relative to the image side (>= 1); SSD uses 4.
        fill: canvas value per channel, on the image's scale (0-255 for ``uint8``), e.g. the mean
            pixel in RGB. ``uint8`` images get the value rounded.
        p: probability of applying the zoom-out (SSD: 0.5).
    """

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[float] | float = 0.0, p: float = 0.5):
        if not max_ratio >= 1.0:
            raise ValueError(f"ZoomOut max_ratio must be >= 1, got {max_ratio!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ZoomOut p must be in [0, 1], got {p!r}")
        fill = _check_fill(fill, "ZoomOut fill")
        super().__init__(padding=0, fill=fill, fill_mask=0, border_mode=cv2.BORDER_CONSTANT, p=p)
        self.max_ratio = float(max_ratio)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_ratio)
        left = int(self.py_random.uniform(0.0, width * ratio - width))
        top = int(self.py_random.uniform(0.0, height * ratio - height))
        canvas_w, canvas_h = int(width * ratio), int(height * ratio)
        return {
            "pad_top": top,
            "pad_bottom": max(canvas_h - height - top, 0),
            "pad_left": left,
            "pad_right": max(canvas_w - width - left, 0),
        }

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


def _centres_inside(boxes: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    return (cx > rect[0]) & (cy > rect[1]) & (cx < rect[2]) & (cy < rect[3])


class MinIoURandomCrop(A.DualTransform):
    """The SSD random crop sampler (ssd.pytorch ``RandomSampleCrop``, Caffe SSD's batch samplers).

    Each call draws a mode from ``modes``. ``None`` keeps the whole image. A number ``t`` means:
    try up to ``max_trials`` crops with sides ``U(min_scale, max_scale)`` of the image's sides and
    pixel aspect ``h / w`` in ``[min_aspect, max_aspect]``, at a uniform position, and accept the
    first one where at least one box has its centre strictly inside the crop and, among those,
    at least one box has IoU ``>= t`` with the crop (``t = 0``: no IoU constraint). If all trials
    fail, another mode is drawn (as ssd.pytorch does), at most ``100`` times before keeping the
    whole image. Unlike ssd.pytorch, whose test ``overlap.min() < min_iou and max_iou <
    overlap.max()`` can never be true, the IoU constraint is enforced.

    Boxes whose centre is outside the crop are dropped (their labels with them), the others are
    clipped to the crop. An image without boxes gets a crop with only the size/aspect
    constraints.

    Args:
        modes: the sampler's modes (see :data:`SSD_CROP_MODES`).
        min_scale, max_scale: crop side range, as a fraction of the image side.
        min_aspect, max_aspect: range of the crop's ``height / width`` in pixels.
        max_trials: attempts per mode.
        p: probability of running the sampler at all (SSD: 1; the ``None`` mode already keeps
            the image some of the time).
    """

    def __init__(
        self,
        modes: Sequence[float | None] = SSD_CROP_MODES,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect: float = 0.5,
        max_aspect: float = 2.0,
        max_trials: int = 50,
        p: float = 1.0,
    ):
        modes = tuple(None if m is None else float(m) for m in modes)
        if not modes:
            raise ValueError("MinIoURandomCrop modes must not be empty, e.g. SSD_CROP_MODES")
        if any(m is not None and not 0.0 <= m <= 1.0 for m in modes):
            raise ValueError(f"MinIoURandomCrop modes must be None or IoUs in [0, 1], got {modes!r}")
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ValueError(
                f"MinIoURandomCrop needs 0 < min_scale <= max_scale <= 1, got {min_scale!r}, {max_scale!r}"
            )
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(
                f"MinIoURandomCrop needs 0 < min_aspect <= max_aspect, got {min_aspect!r}, {max_aspect!r}"
            )
        if int(max_trials) < 1:
            raise ValueError(f"MinIoURandomCrop max_trials must be >= 1, got {max_trials!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"MinIoURandomCrop p must be in [0, 1], got {p!r}")
        super().__init__(p=p)
        self.modes = modes
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.max_trials = int(max_trials)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("modes", "min_scale", "max_scale", "min_aspect", "max_aspect", "max_trials")

    # -- parameters -------------------------------------------------------------------------

    def sample_crop(
        self, image_shape: tuple[int, int], boxes: np.ndarray, min_iou: float
    ) -> tuple[int, int, int, int] | None:
        """One mode's search: up to ``max_trials`` crops for ``min_iou``; ``None`` if all fail.

        ``boxes`` are pixel ``x1, y1, x2, y2`` [M, 4]; the crop is ``(x1, y1, x2, y2)`` in pixels.
        The trials are drawn at once and the first acceptable one is taken, which is the same
        distribution as trying them one after the other.
        """
        height, width = image_shape
        n = self.max_trials
        rng = self.random_generator
        w = rng.uniform(self.min_scale * width, self.max_scale * width, n)
        h = rng.uniform(self.min_scale * height, self.max_scale * height, n)
        left = rng.uniform(0.0, 1.0, n) * (width - w)
        top = rng.uniform(0.0, 1.0, n) * (height - h)
        rects = np.stack([left, top, left + w, top + h], axis=1).astype(np.int64)  # int() truncation
        aspect = h / w
        ok = (aspect >= self.min_aspect) & (aspect <= self.max_aspect)
        ok &= (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])
        if len(boxes):
            r = rects[:, None, :].astype(np.float64)  # [n, 1, 4] against boxes [M, 4]
            cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
            cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
            inside = (cx > r[..., 0]) & (cy > r[..., 1]) & (cx < r[..., 2]) & (cy < r[..., 3])
            iw = np.clip(np.minimum(boxes[:, 2], r[..., 2]) - np.maximum(boxes[:, 0], r[..., 0]), 0.0, None)
            ih = np.clip(np.minimum(boxes[:, 3], r[..., 3]) - np.maximum(boxes[:, 1], r[..., 1]), 0.0, None)
            inter = iw * ih
            area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            area_r = (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
            iou = inter / np.maximum(area_b + area_r - inter, 1e-12)
            ok &= (inside & (iou >= min_iou)).any(axis=1)
        if not ok.any():
            return None
        x1, y1, x2, y2 = (int(v) for v in rects[int(np.argmax(ok))])
        return (x1, y1, x2, y2)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = (0, 0, width, height)
        bboxes = data.get("bboxes")
        if bboxes is None or len(bboxes) == 0:
            boxes = np.zeros((0, 4), dtype=np.float64)
        else:
            boxes = np.asarray(bboxes, dtype=np.float64)[:, :4] * np.array([width, height, width, height])
        for _ in range(_MAX_MODE_DRAWS):
            mode = self.modes[self.py_random.randrange(len(self.modes))]
            if mode is None:
                return {"crop_coords": whole}
            rect = self.sample_crop((height, width), boxes, mode)
            if rect is not None:
                return {"crop_coords": rect}
        return {"crop_coords": whole}

    # -- targets ----------------------------------------------------------------------------

    @staticmethod
    def _is_whole(crop_coords: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
        return tuple(crop_coords) == (0, 0, shape[1], shape[0])

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        if self._is_whole(crop_coords, img.shape):
            return img
        x1, y1, x2, y2 = crop_coords
        return img[y1:y2, x1:x2]

    def apply_to_mask(self, mask: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return self.apply(mask, crop_coords)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        shape = params["shape"]
        if len(bboxes) == 0 or self._is_whole(crop_coords, shape):
            return bboxes
        height, width = shape[:2]
        x1, y1, x2, y2 = crop_coords
        scale = np.array([width, height, width, height], dtype=np.float64)
        pixels = bboxes[:, :4].astype(np.float64) * scale
        keep = _centres_inside(pixels, crop_coords)
        out = bboxes[keep].astype(np.float64)  # label columns ride along
        pixels = pixels[keep]
        pixels[:, [0, 2]] = np.clip(pixels[:, [0, 2]], x1, x2) - x1
        pixels[:, [1, 3]] = np.clip(pixels[:, [1, 3]], y1, y2) - y1
        out[:, :4] = pixels / np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1], dtype=np.float64)
        return out.astype(bboxes.dtype, copy=False)

    def apply_to_keypoints(
        self, keypoints: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        out = keypoints.copy()
        out[:, 0] -= crop_coords[0]
        out[:, 1] -= crop_coords[1]
        return out


def ssd_photometric_distort(
    *,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta_degrees: float = 18.0,
    p: float = 0.5,
) -> A.Sequential:
    """SSD's ``PhotometricDistort`` from albumentations transforms, on ``uint8`` RGB.

    Brightness ``+U(-delta, delta)`` (0-255 scale), then either contrast, saturation, hue or
    saturation, hue, contrast (each order with probability 1/2); every step is applied with
    probability ``p``. Contrast multiplies the pixels by ``U(contrast_range)`` (SSD's
    ``RandomContrast``, no mean shift), saturation blends with the grey image by
    ``U(saturation_range)``, hue rotates by ``U(-hue_delta, hue_delta)`` degrees. Unlike
    ssd.pytorch (float32 throughout, no clipping between steps), values are clipped to 0-255
    after each step, and the random channel swap (``RandomLightingNoise``) is not included.
    """

    def contrast() -> A.BasicTransform:
        return A.RandomBrightnessContrast(
            brightness_limit=(0.0, 0.0),
            contrast_limit=(contrast_range[0] - 1.0, contrast_range[1] - 1.0),
            p=p,
        )

    def saturation() -> A.BasicTransform:
        return A.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=saturation_range, hue=(0.0, 0.0), p=p)

    def hue() -> A.BasicTransform:
        h = hue_delta_degrees / 360.0
        return A.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=(-h, h), p=p)

    brightness = A.RandomBrightnessContrast(
        brightness_limit=(-brightness_delta / 255.0, brightness_delta / 255.0),
        contrast_limit=(0.0, 0.0),
        brightness_by_max=True,
        p=p,
    )
    return A.Sequential(
        [
            brightness,
            A.OneOf(
                [
                    A.Sequential([contrast(), saturation(), hue()], p=1.0),
                    A.Sequential([saturation(), hue(), contrast()], p=1.0),
                ],
                p=1.0,
            ),
        ],
        p=1.0,
    )


def _check_size_mean_std(input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 1:
        raise ValueError(f"input_size must be a positive int (e.g. 300), got {input_size!r}")
    if len(tuple(mean)) != 3 or len(tuple(std)) != 3:
        raise ValueError(f"mean and std need 3 RGB values on the 0-255 scale, got mean={mean!r}, std={std!r}")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {std!r}")


def _bbox_params(min_box_size: float) -> A.BboxParams:
    if not min_box_size > 0:
        raise ValueError(f"min_box_size must be > 0 pixels (degenerate boxes are never kept), got {min_box_size!r}")
    # check_each_transform=False: boxes are filtered once, at the network input size, so that
    # min_box_size means pixels of the input; MinIoURandomCrop clips to its crop itself.
    return A.BboxParams(
        format="albumentations",
        label_fields=["labels"],
        min_width=float(min_box_size),
        min_height=float(min_box_size),
        clip=True,
        filter_invalid_bboxes=True,
        check_each_transform=False,
    )


def _finish(
    input_size: int, mean: Sequence[float], std: Sequence[float], interpolation: int
) -> list[A.BasicTransform]:
    return [
        A.Resize(input_size, input_size, interpolation=interpolation),
        A.Normalize(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), max_pixel_value=1.0),
        ToTensorV2(),
    ]


def train_transform(
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    expand_max_ratio: float = 4.0,
    p_expand: float = 0.5,
    photometric: bool = True,
    crop_modes: Sequence[float | None] = SSD_CROP_MODES,
    crop_max_trials: int = 50,
    p_flip: float = 0.5,
    min_box_size: float = 1.0,
    interpolation: int = cv2.INTER_LINEAR,
) -> A.Compose:
    """The SSD training augmentation as an ``albumentations.Compose``.

    Call it as ``t(image=rgb_uint8, bboxes=boxes, labels=labels)`` with ``boxes`` normalised
    ``x1, y1, x2, y2`` [M, 4]; it returns ``image`` (float32 tensor [3, S, S]), ``bboxes``
    (normalised, valid, at least ``min_box_size`` input pixels wide and high) and ``labels``.

    Args:
        input_size: side ``S`` of the square network input.
        mean, std: RGB normalisation on the 0-255 scale; the zoom-out canvas is filled with ``mean``.
        expand_max_ratio: largest zoom-out canvas side relative to the image (``1`` disables it).
        p_expand: probability of the zoom-out.
        photometric: apply :func:`ssd_photometric_distort`.
        crop_modes: modes of :class:`MinIoURandomCrop` (``(None,)`` disables cropping).
        crop_max_trials: crop attempts per mode.
        p_flip: probability of the horizontal flip.
        min_box_size: boxes narrower or lower than this many pixels at the input size are dropped.
        interpolation: OpenCV interpolation of the final resize.
    """
    _check_size_mean_std(input_size, mean, std)
    if not 0.0 <= p_flip <= 1.0:
        raise ValueError(f"p_flip must be in [0, 1], got {p_flip!r}")
    steps: list[A.BasicTransform | A.BaseCompose] = []
    if photometric:
        steps.append(ssd_photometric_distort())
    if expand_max_ratio > 1.0 and p_expand > 0.0:
        steps.append(ZoomOut(max_ratio=expand_max_ratio, fill=tuple(float(m) for m in mean), p=p_expand))
    elif expand_max_ratio < 1.0:
        raise ValueError(f"expand_max_ratio must be >= 1, got {expand_max_ratio!r}")
    steps.append(MinIoURandomCrop(modes=crop_modes, max_trials=crop_max_trials, p=1.0))
    if p_flip > 0.0:
        steps.append(A.HorizontalFlip(p=p_flip))
    steps += _finish(input_size, mean, std, interpolation)
    return A.Compose(steps, bbox_params=_bbox_params(min_box_size), p=1.0)


def eval_transform(
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    min_box_size: float = 1.0,
    interpolation: int = cv2.INTER_LINEAR,
) -> A.Compose:
    """Deterministic evaluation transform: resize to ``S x S``, normalise, CHW float32 tensor.

    Same call and box conventions as :func:`train_transform`.
    """
    _check_size_mean_std(input_size, mean, std)
    return A.Compose(_finish(input_size, mean, std, interpolation), bbox_params=_bbox_params(min_box_size), p=1.0)
