"""Batch collation into the training-tensor contract (docs/CONTRACTS.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["detection_collate"]


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, torch.Tensor]:
    """Stack ``(image, target)`` pairs from :class:`~fssd.data.dataset.DetectionDataset`.

    Returns a dict with
    ``images`` float32 [N, 3, S, S];
    ``boxes`` float32 [N, M, 4], normalised x1, y1, x2, y2, padded rows all 0;
    ``labels`` int64 [N, M], 1..K for objects and -1 for padding;
    ``ignore`` bool [N, M], True for ignore regions (a dataset with ``ignored="ignore"``), False
    for objects and padding;
    ``image_ids`` int64 [N]; ``orig_sizes`` int64 [N, 2] as (h, w).
    ``M`` is the largest object count in the batch, at least 1.
    """
    if len(batch) == 0:
        raise ValueError("detection_collate got an empty batch")
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(
            f"detection_collate needs images of one shape, got {sorted(shapes)}; resize them to the "
            "model input size in the transform (train_transform / eval_transform)"
        )
    n = len(batch)
    m = max(1, max(int(t["boxes"].shape[0]) for t in targets))
    boxes = torch.zeros((n, m, 4), dtype=torch.float32)
    labels = torch.full((n, m), -1, dtype=torch.int64)
    ignore = torch.zeros((n, m), dtype=torch.bool)
    for i, t in enumerate(targets):
        k = int(t["boxes"].shape[0])
        if int(t["labels"].shape[0]) != k:
            raise ValueError(f"sample {i} (image id {t.get('image_id')}) has {k} boxes but {t['labels'].shape[0]} labels")
        if k:
            boxes[i, :k] = t["boxes"].to(torch.float32)
            labels[i, :k] = t["labels"].to(torch.int64)
            if "ignore" in t:
                ignore[i, :k] = t["ignore"].to(torch.bool)
    return {
        "images": torch.stack(images).to(torch.float32),
        "boxes": boxes,
        "labels": labels,
        "ignore": ignore,
        "image_ids": torch.tensor([int(t["image_id"]) for t in targets], dtype=torch.int64),
        "orig_sizes": torch.tensor([[int(s) for s in t["orig_size"]] for t in targets], dtype=torch.int64),
    }
