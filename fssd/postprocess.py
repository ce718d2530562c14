"""Detection post-processing: decode, score threshold, top-k, batched NMS."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from .boxes import decode

__all__ = ["postprocess"]


def _rank_within_groups(groups: Tensor) -> Tensor:
    """Rank of each element within its group, for elements already in descending-score order."""
    if groups.numel() == 0:
        return groups.clone()
    order = torch.sort(groups, stable=True).indices  # keeps the score order inside a group
    sorted_groups = groups[order]
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    idx = torch.arange(groups.numel(), device=groups.device)
    group_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    rank_sorted = idx - group_start
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


@torch.no_grad()
def postprocess(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    *,
    image_sizes: Sequence[tuple[int, int]] | Tensor,
    variances: tuple[float, float] = (0.1, 0.2),
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    pre_nms_top_k: int | None = 400,
    top_k_per_class: int | None = 200,
    max_detections: int = 200,
    plus_one: bool = False,
) -> list[dict[str, Tensor]]:
    """Turn raw network outputs into per-image detections, for the whole batch at once.

    Softmax scores; every (prior, class >= 1) pair scoring above ``score_threshold`` is a
    candidate; the ``pre_nms_top_k`` best candidates per image and class go on (400 as in
    torchvision's SSD; None keeps all, as the authors' evaluation did); NMS per image and class (``torchvision.ops.batched_nms``, suppressing IoU > ``nms_threshold``);
    at most ``top_k_per_class`` per class and ``max_detections`` per image, by score.

    Boxes are returned in pixels of ``image_sizes`` ((height, width) per image; the network
    input size for detections on the resized image, the original size to map back), not
    clipped. ``plus_one=True`` runs NMS with the VOC devkit's "+1 pixel" area convention (the
    authors' ``py_cpu_nms``), by shifting x2/y2 by one pixel for the NMS only.

    Returns one dict per image with ``boxes`` [K,4] (x1, y1, x2, y2), ``scores`` [K] and
    ``labels`` [K] (1..C-1), sorted by descending score.
    """
    n, p, c = conf.shape
    if loc.shape != (n, p, 4):
        raise ValueError(f"loc must have shape {(n, p, 4)}, got {tuple(loc.shape)}")
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=loc.device).reshape(-1, 2)
    if sizes.shape[0] == 1 and n > 1:
        sizes = sizes.expand(n, 2)
    if sizes.shape[0] != n:
        raise ValueError(f"image_sizes has {sizes.shape[0]} entries for a batch of {n}")

    scores = F.softmax(conf.float(), dim=-1)[..., 1:]  # [N, P, C-1]
    boxes = decode(loc.float(), priors.float(), variances)  # [N, P, 4] normalised
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # w, h, w, h
    boxes = boxes * scale[:, None, :]

    img_idx, prior_idx, cls_idx = torch.nonzero(scores > score_threshold, as_tuple=True)
    cand_scores = scores[img_idx, prior_idx, cls_idx]
    # One canonical candidate order: descending score, equal scores in (image, prior, class) order
    # (nonzero's), so that ties are resolved the same way on every device and batch split.
    order = torch.sort(cand_scores, descending=True, stable=True).indices
    img_idx, prior_idx, cls_idx, cand_scores = img_idx[order], prior_idx[order], cls_idx[order], cand_scores[order]
    groups = img_idx * (c - 1) + cls_idx
    rank = _rank_within_groups(groups)  # 0 = the best candidate of its (image, class)
    if pre_nms_top_k is not None:
        sel = rank < pre_nms_top_k
        img_idx, prior_idx, cls_idx = img_idx[sel], prior_idx[sel], cls_idx[sel]
        cand_scores, groups, rank = cand_scores[sel], groups[sel], rank[sel]
    cand_boxes = boxes[img_idx, prior_idx]
    nms_boxes = cand_boxes + cand_boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) if plus_one else cand_boxes
    if nms_boxes.numel():
        # batched_nms separates the groups by offsets of (max coordinate + 1), which assumes
        # coordinates >= 0; unclipped boxes hanging off the top-left would let one class or one
        # image of the batch suppress another's boxes. IoU does not change under a translation.
        nms_boxes = nms_boxes - nms_boxes.min()
    # NMS ranks by the canonical order (exact in float32: a rank is below the number of priors);
    # its decisions are those of the scores, with equal scores resolved deterministically.
    keep = batched_nms(nms_boxes, -rank.to(nms_boxes.dtype), groups, nms_threshold)
    keep = torch.sort(keep).values  # back to the canonical (descending score) order
    if top_k_per_class is not None:
        keep = keep[_rank_within_groups(groups[keep]) < top_k_per_class]
    keep = keep[_rank_within_groups(img_idx[keep]) < max_detections]

    out_img = img_idx[keep]
    counts = torch.bincount(out_img, minlength=n).tolist()
    order = torch.sort(out_img, stable=True).indices
    keep = keep[order]
    results = []
    for b, s, l in zip(
        cand_boxes[keep].split(counts), cand_scores[keep].split(counts), (cls_idx[keep] + 1).split(counts)
    ):
        results.append({"boxes": b, "scores": s, "labels": l})
    return results
