"""Box encoding, decoding and prior matching, batched and device-agnostic.

IoU comes from ``torchvision.ops.box_iou``; since the priors are shared by every image,
a batch of padded targets [N, M, 4] is matched with one [N*M, P] IoU call, without a
per-image Python loop.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

__all__ = ["encode", "decode", "match", "validate_targets"]


def encode(matched: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """Encode (x1, y1, x2, y2) boxes against (cx, cy, w, h) priors as SSD offsets.

    ``matched`` [..., P, 4] and ``priors`` [P, 4] broadcast; returns (dx, dy, dw, dh).
    """
    centre = (matched[..., :2] + matched[..., 2:]) / 2
    size = matched[..., 2:] - matched[..., :2]
    d_centre = (centre - priors[..., :2]) / (variances[0] * priors[..., 2:])
    d_size = torch.log(size / priors[..., 2:]) / variances[1]
    return torch.cat([d_centre, d_size], dim=-1)


def decode(loc: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """Decode SSD offsets [..., P, 4] against priors [P, 4] into normalised (x1, y1, x2, y2)."""
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def validate_targets(boxes: Tensor, labels: Tensor) -> None:
    """Raise ``ValueError`` for padded targets that would silently poison the loss.

    ``boxes`` [N, M, 4] normalised (x1, y1, x2, y2); ``labels`` [N, M] int, -1 marks padding.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"target boxes must have shape [N, M, 4], got {tuple(boxes.shape)}")
    if labels.shape != boxes.shape[:2]:
        raise ValueError(
            f"target labels must have shape [N, M] = {tuple(boxes.shape[:2])}, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point:
        raise ValueError(f"target labels must be integers, got dtype {labels.dtype}")
    valid = labels >= 0
    if not valid.any():
        return
    b = boxes[valid]
    problems = []
    if not torch.isfinite(b).all():
        problems.append(("non-finite target box", b[~torch.isfinite(b).all(dim=1)][0]))
    else:
        bad_order = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        if bad_order.any():
            problems.append(("target box with x2 <= x1 or y2 <= y1", b[bad_order][0]))
        out = ((b < 0) | (b > 1)).any(dim=1)
        if out.any():
            problems.append(("target box outside [0, 1] (boxes must be normalised)", b[out][0]))
    if problems:
        what, value = problems[0]
        raise ValueError(f"{what}: {value.tolist()}")
    if (labels[valid] == 0).any():
        raise ValueError("target label 0 is the background class; object labels run from 1 to num_classes - 1")


def match(
    boxes: Tensor,
    labels: Tensor,
    priors: Tensor,
    iou_threshold: float,
    variances: tuple[float, float],
) -> tuple[Tensor, Tensor]:
    """Assign every prior a target, as SSD does, for a whole padded batch at once.

    Each prior takes the ground truth it overlaps most; each ground truth then claims its
    best prior outright (when two claim the same prior, the later one wins, as in the
    reference loop). Priors whose best IoU is below ``iou_threshold`` become background.

    Args:
        boxes: [N, M, 4] normalised (x1, y1, x2, y2); rows with label -1 are padding.
        labels: [N, M] int64 class ids 1..C-1, -1 for padding.
        priors: [P, 4] (cx, cy, w, h).
    Returns:
        loc_t [N, P, 4] encoded offsets and conf_t [N, P] int64 labels (0 = background).
    """
    n, m = labels.shape
    p = priors.shape[0]
    valid = labels >= 0  # [N, M]
    if m == 0 or not bool(valid.any()):
        return priors.new_zeros(n, p, 4), torch.zeros(n, p, dtype=torch.long, device=priors.device)
    point_priors = box_convert(priors, "cxcywh", "xyxy")
    overlaps = box_iou(boxes.reshape(-1, 4), point_priors).reshape(n, m, p)
    overlaps = overlaps.masked_fill(~valid.unsqueeze(-1), -1.0)

    best_truth_overlap, best_truth_idx = overlaps.max(dim=1)  # [N, P]
    best_prior_idx = overlaps.argmax(dim=2)  # [N, M]

    # Each valid ground truth claims its best prior; padding rows write into a spare column.
    target_col = torch.where(valid, best_prior_idx, torch.full_like(best_prior_idx, p))
    truth_ids = torch.arange(m, device=labels.device).expand(n, m)
    forced = torch.full((n, p + 1), -1, dtype=torch.long, device=labels.device)
    forced.scatter_reduce_(1, target_col, truth_ids, reduce="amax")  # later truth wins
    forced = forced[:, :p]
    is_forced = forced >= 0
    best_truth_idx = torch.where(is_forced, forced, best_truth_idx)
    best_truth_overlap = best_truth_overlap.masked_fill(is_forced, 2.0)

    matched = torch.gather(boxes, 1, best_truth_idx.unsqueeze(-1).expand(n, p, 4))
    conf_t = torch.gather(labels, 1, best_truth_idx)
    conf_t = conf_t.masked_fill(best_truth_overlap < iou_threshold, 0)
    loc_t = encode(matched, priors, variances)
    return loc_t, conf_t
