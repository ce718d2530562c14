"""The self-describing FSSD checkpoint file.

One ``torch.save`` file, loadable with ``torch.load(..., weights_only=True)``::

    {"format": "fssd-checkpoint", "version": 1,
     "config": DetectorConfig.to_dict(), "class_names": [...],
     "model": state_dict, "training": {...} (optional: optimizer, scheduler, scaler, EMA,
     epoch, RNG states; plain containers and tensors only), "meta": {...}}

The model is rebuilt from the stored config alone (:func:`load_model`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import DetectorConfig
from .engine import unwrap
from .models.fssd import FSSD
from .models.presets import build_detector

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model"]

FORMAT = "fssd-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not an FSSD checkpoint."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: DetectorConfig,
    class_names: list[str],
    *,
    training: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically. ``class_names`` lists the K object classes (no background)."""
    if len(class_names) != config.model.num_classes - 1:
        raise CheckpointError(
            f"{len(class_names)} class names given for num_classes={config.model.num_classes} "
            "(which counts the background); give the object classes only"
        )
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "class_names": list(class_names),
        "model": state,
        "training": dict(training) if training else None,
        "meta": dict(meta) if meta else {},
    }
    atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint (``weights_only=True``); ``config`` becomes a DetectorConfig."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an FSSD checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{p} has checkpoint version {payload['version']}, newer than this code's {VERSION}; upgrade fssd"
        )
    payload = dict(payload)
    payload["config"] = DetectorConfig.from_dict(payload["config"], "config")
    return payload


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[FSSD, dict[str, Any]]:
    """Rebuild the model from a checkpoint's stored config and load its weights (eval mode)."""
    payload = load_checkpoint(path, map_location)
    model = build_detector(payload["config"])
    model.load_state_dict(payload["model"])
    model.to(map_location).eval()
    return model, payload
