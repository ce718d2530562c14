"""Images in, detections out: the inference front end of an FSSD model.

:class:`Predictor` wraps a model and its class names. ``predict`` takes RGB ``uint8`` images of any
sizes, preprocesses them exactly as evaluation does (:func:`fssd.data.transforms.eval_transform`:
resize to the square network input, ``(pixel - mean) / std`` with the model config's
``image_mean``/``image_std``), runs the network in batches and :func:`fssd.postprocess.postprocess`
with the original image sizes, so the boxes come back in each image's own pixels.

Used by the evaluation stage (speed), ``fssd detect`` and the MLflow pyfunc model. The library
never imports ray, mlflow, dvc, boto3 or yaml.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .checkpoint import load_model
from .config import PostprocessConfig
from .data.transforms import eval_transform
from .postprocess import postprocess

__all__ = ["Predictor", "read_image", "decode_image", "draw_detections", "write_image"]

_DEFAULTS = PostprocessConfig()
_NULLABLE = ("pre_nms_top_k", "top_k_per_class")  # None means "no limit" for these


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Batched FSSD inference on RGB ``uint8`` images of any size.

    Args:
        model: an :class:`fssd.FSSD` (or a wrapper with ``.module``); moved to ``device`` and put
            in eval mode.
        class_names: the K object class names; label ``k`` (1..K) is ``class_names[k - 1]``.
        category_ids: the dataset's own id of each class (``category_ids[k - 1]``, e.g. COCO's
            non-contiguous ids); default: the labels 1..K.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
        score_threshold, nms_threshold, pre_nms_top_k, top_k_per_class, max_detections, plus_one:
            post-processing (see :func:`fssd.postprocess.postprocess`).
        batch_size: images per forward pass in :meth:`predict`.
        amp: autocast to ``amp_dtype`` on CUDA (ignored on CPU); default on for CUDA.
        amp_dtype: ``torch.bfloat16`` (default) or ``torch.float16``.
        channels_last: channels-last memory format (faster on CUDA and on CPU with oneDNN).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        category_ids: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        score_threshold: float = _DEFAULTS.score_threshold,
        nms_threshold: float = _DEFAULTS.nms_threshold,
        pre_nms_top_k: int | None = _DEFAULTS.pre_nms_top_k,
        top_k_per_class: int | None = _DEFAULTS.top_k_per_class,
        max_detections: int = _DEFAULTS.max_detections,
        plus_one: bool = _DEFAULTS.plus_one,
        batch_size: int = 16,
        amp: bool | None = None,
        amp_dtype: torch.dtype = torch.bfloat16,
        channels_last: bool = False,
    ) -> None:
        while hasattr(model, "module") or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or getattr(model, "_orig_mod")
        for attr in ("config", "priors", "prior_config"):
            if not hasattr(model, attr):
                raise ValueError(f"Predictor needs an fssd.FSSD model (with .{attr}), got {type(model).__name__}")
        num_classes = int(model.config.num_classes)
        if len(class_names) != num_classes - 1:
            raise ValueError(
                f"{len(class_names)} class names given for a model with {num_classes - 1} object classes "
                "(num_classes counts the background); give one name per object class"
            )
        if not 0.0 <= float(score_threshold) < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold!r}")
        if not 0.0 < float(nms_threshold) <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.class_names = [str(n) for n in class_names]
        if category_ids is not None and len(category_ids) != len(self.class_names):
            raise ValueError(f"{len(category_ids)} category ids given for {len(self.class_names)} classes")
        self.category_ids = [int(c) for c in category_ids] if category_ids is not None else list(range(1, num_classes))
        cfg = model.config
        self.input_size = int(cfg.input_size)
        self.image_mean = tuple(float(v) for v in cfg.image_mean)
        self.image_std = tuple(float(v) for v in cfg.image_std)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.pre_nms_top_k = pre_nms_top_k
        self.top_k_per_class = top_k_per_class
        self.max_detections = int(max_detections)
        self.plus_one = bool(plus_one)
        self.batch_size = batch_size
        cuda = self.device.type == "cuda"
        if amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype if (cuda and (amp is None or amp)) else None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._transform = eval_transform(self.input_size, self.image_mean, self.image_std)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, **overrides: Any
    ) -> "Predictor":
        """A predictor for an FSSD checkpoint file (:func:`fssd.checkpoint.save_checkpoint`).

        Post-processing defaults come from the checkpoint's config (``config.postprocess``);
        ``overrides`` set any constructor keyword (``score_threshold=0.3``, ``batch_size=32``...);
        ``None`` keeps the checkpoint's value (for ``pre_nms_top_k`` / ``top_k_per_class`` it means no limit).
        Raises :class:`fssd.checkpoint.CheckpointError` (a ValueError) naming the file.
        """
        dev = _device(device)
        model, payload = load_model(path, map_location=dev)
        post = payload["config"].postprocess
        kwargs: dict[str, Any] = {
            "score_threshold": post.score_threshold,
            "nms_threshold": post.nms_threshold,
            "pre_nms_top_k": post.pre_nms_top_k,
            "top_k_per_class": post.top_k_per_class,
            "max_detections": post.max_detections,
            "plus_one": post.plus_one,
        }
        # an override of None keeps the checkpoint's value, except where None means "no limit"
        kwargs.update({k: v for k, v in overrides.items() if v is not None or k in _NULLABLE})
        category_ids = (payload.get("meta") or {}).get("category_ids")
        return cls(model, payload["class_names"], category_ids=category_ids, device=dev, **kwargs)

    # ------------------------------------------------------------------------------------------

    def _check(self, image: Any, index: int) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image {index} must be a numpy array (RGB uint8, HxWx3), got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"image {index} must have dtype uint8 (0-255 RGB), got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image {index} must be HxWx3 RGB (or HxW grey), got shape {image.shape}")
        return np.ascontiguousarray(image)

    def preprocess(
        self, images: Sequence[np.ndarray], *, first_index: int = 0
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Stack images into the normalised [N, 3, S, S] float32 batch; returns it with the (h, w) sizes.

        ``first_index`` only numbers the images in error messages.
        """
        tensors, sizes = [], []
        empty_boxes = np.zeros((0, 4), dtype=np.float32)
        empty_labels = np.zeros((0,), dtype=np.int64)
        for i, image in enumerate(images):
            image = self._check(image, first_index + i)
            out = self._transform(image=image, bboxes=empty_boxes, labels=empty_labels)
            tensors.append(out["image"])
            sizes.append((int(image.shape[0]), int(image.shape[1])))
        return torch.stack(tensors).to(torch.float32), sizes

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    @torch.no_grad()
    def predict_batch(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]],
                      score_threshold: float | None = None) -> list[dict[str, Any]]:
        """Network + post-processing on an already preprocessed batch (see :meth:`preprocess`)."""
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            loc, conf = self.model(x)
        dets = postprocess(
            loc.float(), conf.float(), self.model.priors, image_sizes=list(sizes),
            variances=self.model.prior_config.variances,
            score_threshold=self.score_threshold if score_threshold is None else float(score_threshold),
            nms_threshold=self.nms_threshold, pre_nms_top_k=self.pre_nms_top_k,
            top_k_per_class=self.top_k_per_class, max_detections=self.max_detections, plus_one=self.plus_one,
        )
        out = []
        for d in dets:
            labels = d["labels"].cpu().numpy().astype(np.int64)
            out.append({
                "boxes": d["boxes"].cpu().numpy().astype(np.float32).reshape(-1, 4),
                "scores": d["scores"].cpu().numpy().astype(np.float32),
                "labels": labels,
                "names": [self.class_names[int(k) - 1] for k in labels],
                "category_ids": [self.category_ids[int(k) - 1] for k in labels],
            })
        return out

    def predict(
        self,
        images: Sequence[np.ndarray],
        *,
        batch_size: int | None = None,
        score_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Detections for each image, in order.

        Args:
            images: RGB ``uint8`` arrays [H, W, 3] (HxW grey and HxWx4 RGBA are accepted too);
                sizes may differ.
            batch_size: images per forward pass (default: the predictor's).
            score_threshold: override the score threshold for this call.

        Returns:
            one dict per image: ``boxes`` float32 [K, 4] (x1, y1, x2, y2) in that image's pixels
            (not clipped), ``scores`` float32 [K], ``labels`` int64 [K] in 1..K, ``names`` list of
            K class names, sorted by descending score (equal scores in prior order).

        An image's detections do not depend on the other images of its batch, up to float
        rounding: the convolution kernels (oneDNN, cuDNN) differ with the batch shape and the
        machine, so scores can move by ~1e-6 with ``batch_size`` or the device, and detections
        with nearly equal scores can swap ranks. Compare results as sets, not by rank.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == np.uint8 and images.shape[-1] in (3, 4):
            raise ValueError("predict takes a list of images; wrap a single image as [image]")
        bs = batch_size or self.batch_size
        results: list[dict[str, Any]] = []
        images = list(images)
        for start in range(0, len(images), bs):
            chunk = images[start : start + bs]
            batch, sizes = self.preprocess(chunk, first_index=start)
            results.extend(self.predict_batch(batch, sizes, score_threshold))
        return results

    def __call__(self, images: Sequence[np.ndarray], **kwargs: Any) -> list[dict[str, Any]]:
        return self.predict(images, **kwargs)


# ----------------------------------------------------------------------------------------------
# image helpers shared by `fssd detect`, the evaluation stage and the MLflow model


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB ``uint8`` [H, W, 3]; ValueError naming the file if it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {p} does not exist" if not p.exists() else f"image {p} is not a file")
    data = np.fromfile(str(p), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"image {p} cannot be decoded (corrupt, empty or not an image format OpenCV reads)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) as RGB ``uint8`` [H, W, 3]; ValueError if undecodable."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None:
        raise ValueError(f"{len(buf)} bytes cannot be decoded as an image (JPEG, PNG, ...)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(int(label) * 7919 + 17)
    c = rng.integers(64, 256, size=3)
    return int(c[0]), int(c[1]), int(c[2])


def draw_detections(
    image: np.ndarray,
    detections: dict[str, Any],
    *,
    score_threshold: float = 0.3,
    thickness: int | None = None,
) -> np.ndarray:
    """A copy of RGB ``image`` with the boxes scoring ``>= score_threshold`` drawn and labelled.

    ``detections`` is one entry of :meth:`Predictor.predict` (``boxes``, ``scores``, ``labels``,
    ``names``).
    """
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    t = thickness or max(1, round(min(h, w) / 250))
    font_scale = max(0.35, min(h, w) / 800)
    boxes = np.asarray(detections["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detections["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(detections["labels"]).reshape(-1)
    names = list(detections.get("names") or [str(int(k)) for k in labels])
    order = np.argsort(scores, kind="stable")  # draw the best last, on top
    for i in order:
        if scores[i] < score_threshold:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        x1, x2 = max(0, min(w - 1, x1)), max(0, min(w - 1, x2))
        y1, y2 = max(0, min(h - 1, y1)), max(0, min(h - 1, y2))
        colour = _colour(int(labels[i]))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, t)
        text = f"{names[i]} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(h - 1, y1 + th + base + 2)
        cv2.rectangle(out, (x1, ty - th - base), (min(w - 1, x1 + tw + 2), ty), colour, -1)
        cv2.putText(out, text, (x1 + 1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def write_image(path: str | os.PathLike, image_rgb: np.ndarray, *, jpeg_quality: int = 90) -> None:
    """Write an RGB image atomically (format from the suffix; unknown suffixes get ``.jpg``'s encoder)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ext = p.suffix.lower() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff") else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode an image for {p}")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
