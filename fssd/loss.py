"""MultiBox loss (Smooth L1 + cross-entropy) with hard-negative mining, batched."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from torchvision.ops import box_convert, box_iou

from .boxes import match, validate_targets

__all__ = ["MultiBoxLoss", "LossOutput"]


class LossOutput(NamedTuple):
    """Loss parts, each already divided by the normaliser; ``num_pos`` is the local count."""

    loc: Tensor
    conf: Tensor
    num_pos: Tensor

    @property
    def total(self) -> Tensor:
        return self.loc + self.conf


class MultiBoxLoss(nn.Module):
    """SSD MultiBox loss.

    Positives are the priors matched with IoU >= ``iou_threshold``; per image the
    ``neg_pos_ratio * num_pos`` background priors with the highest background loss are the
    negatives. Both parts are sums divided by the number of positives in the batch.

    Ignore regions (``ignore`` [N, M] True, e.g. VOC difficult objects with
    ``train.difficult: ignore``) are not matched; a prior that is not positive and overlaps one
    with IoU >= ``iou_threshold`` is neither positive nor negative (never mined).

    Differences from the authors' code: a batch with no positive prior gives a zero loc loss
    and a conf loss over no negatives (no division by zero); with ``distributed=True`` and an
    initialised process group, the normaliser is the number of positives over all ranks
    (all-reduced), scaled so that DDP's gradient averaging yields sum / global positives.
    """

    def __init__(
        self,
        priors: Tensor,
        *,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        variances: tuple[float, float] = (0.1, 0.2),
        loc_weight: float = 1.0,
        distributed: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if priors.dim() != 2 or priors.shape[1] != 4:
            raise ValueError(f"priors must have shape [P, 4], got {tuple(priors.shape)}")
        self.register_buffer("priors", priors.detach().clone(), persistent=False)
        self.iou_threshold = float(iou_threshold)
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.variances = (float(variances[0]), float(variances[1]))
        self.loc_weight = float(loc_weight)
        self.distributed = distributed
        self.validate = validate

    def forward(self, loc: Tensor, conf: Tensor, boxes: Tensor, labels: Tensor,
                ignore: Tensor | None = None) -> LossOutput:
        """``loc`` [N,P,4], ``conf`` [N,P,C] logits; targets padded as in :func:`fssd.boxes.match`;
        ``ignore`` [N,M] bool marks the target rows that are ignore regions (optional)."""
        n, p, _ = loc.shape
        if p != self.priors.shape[0]:
            raise ValueError(f"the network gave {p} priors' outputs but the loss holds {self.priors.shape[0]} priors")
        if self.validate:
            validate_targets(boxes, labels)
            if labels.numel() and int(labels.max()) >= conf.shape[-1]:
                raise ValueError(
                    f"target label {int(labels.max())} is out of range for {conf.shape[-1]} classes (0 = background)"
                )
        ignored_priors = None
        if ignore is not None:
            if ignore.shape != labels.shape:
                raise ValueError(f"ignore must have the labels' shape {tuple(labels.shape)}, got {tuple(ignore.shape)}")
            regions = ignore.to(torch.bool) & (labels >= 0)
            if bool(regions.any()):
                with torch.no_grad():
                    iou = box_iou(boxes.to(self.priors.dtype).reshape(-1, 4),
                                  box_convert(self.priors, "cxcywh", "xyxy")).reshape(n, -1, p)
                    iou = iou.masked_fill(~regions.unsqueeze(-1), 0.0)
                    ignored_priors = iou.amax(dim=1) >= self.iou_threshold  # [N, P]
            labels = labels.masked_fill(ignore.to(torch.bool), -1)  # ignore regions are never matched
        with torch.no_grad():
            loc_t, conf_t = match(
                boxes.to(self.priors.dtype), labels, self.priors, self.iou_threshold, self.variances
            )
        pos = conf_t > 0  # [N, P]
        num_pos_per_image = pos.sum(dim=1)

        loss_l = F.smooth_l1_loss(loc[pos].float(), loc_t[pos], reduction="sum")

        # Background loss of every prior, for ranking the negatives.
        conf_f = conf.float()
        log_probs = F.log_softmax(conf_f, dim=-1)
        with torch.no_grad():
            mining = -log_probs[..., 0].detach()
            mining = mining.masked_fill(pos, 0.0)
            if ignored_priors is not None:
                ignored_priors = ignored_priors & ~pos
                mining = mining.masked_fill(ignored_priors, -1.0)  # ranked after every candidate
            order = mining.argsort(dim=1, descending=True)
            rank = order.argsort(dim=1)
            num_neg = torch.clamp(self.neg_pos_ratio * num_pos_per_image, max=p - 1).long()
            neg = rank < num_neg.unsqueeze(1)
            if ignored_priors is not None:
                neg = neg & ~ignored_priors
        selected = pos | neg
        loss_c = F.nll_loss(log_probs[selected], conf_t[selected], reduction="sum")

        num_pos = num_pos_per_image.sum()
        normaliser = num_pos.to(loss_l.dtype)
        if self.distributed and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            total = normaliser.detach().clone()
            dist.all_reduce(total)
            normaliser = total.clamp(min=1.0) / world
        else:
            normaliser = normaliser.clamp(min=1.0)
        return LossOutput(self.loc_weight * loss_l / normaliser, loss_c / normaliser, num_pos)
