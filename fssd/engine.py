"""Training and evaluation loops, framework-free.

The loops take explicit objects (model, loader, loss, optimizer, scheduler) and work the same
in a plain script, under torchrun or inside a Ray Train worker: distribution only shows up as
an initialised ``torch.distributed`` process group and a DistributedSampler.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from .loss import MultiBoxLoss
from .postprocess import postprocess

__all__ = [
    "BadStepsError",
    "EpochStats",
    "TrainState",
    "LRSchedule",
    "param_groups",
    "make_ema",
    "train_one_epoch",
    "predict",
    "unwrap",
]


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite losses: training stops, the last good checkpoint stays."""


@dataclass
class TrainState:
    """Counters that survive across epochs (and are checkpointed)."""

    step: int = 0
    consecutive_bad: int = 0
    bad_steps: int = 0


@dataclass
class EpochStats:
    loss: float = 0.0
    loss_loc: float = 0.0
    loss_conf: float = 0.0
    images: int = 0
    steps: int = 0
    bad_steps: int = 0
    seconds: float = 0.0
    lr: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile / EMA wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on conv/linear weights; none on BatchNorm parameters and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class LRSchedule:
    """Per-iteration learning-rate factor: linear warmup, then cosine or multistep.

    Warmup goes from ``warmup_factor`` to 1 over ``warmup_iters`` iterations (it really runs:
    the first step uses ``warmup_factor * lr``). Cosine decays to ``final_factor`` at
    ``total_iters``; multistep multiplies by ``gamma`` at each milestone (in iterations).
    A picklable callable, so ``LambdaLR.state_dict()`` round-trips.
    """

    def __init__(
        self,
        total_iters: int,
        *,
        warmup_iters: int = 0,
        warmup_factor: float = 0.1,
        schedule: str = "cosine",
        milestones: Iterable[int] = (),
        gamma: float = 0.1,
        final_factor: float = 0.01,
    ) -> None:
        if schedule not in ("cosine", "multistep"):
            raise ValueError(f"schedule must be 'cosine' or 'multistep', got {schedule!r}")
        self.total_iters = max(1, int(total_iters))
        self.warmup_iters = max(0, int(warmup_iters))
        self.warmup_factor = float(warmup_factor)
        self.schedule = schedule
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.final_factor = float(final_factor)

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            return self.warmup_factor * (1 - alpha) + alpha
        if self.schedule == "multistep":
            return self.gamma ** sum(1 for m in self.milestones if it >= m)
        span = max(1, self.total_iters - self.warmup_iters)
        progress = min(1.0, (it - self.warmup_iters) / span)
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, self)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """Exponential moving average of weights and buffers (torch's AveragedModel)."""
    return torch.optim.swa_utils.AveragedModel(
        unwrap(model), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_finite(loss: Tensor) -> bool:
    """True when the loss is finite on every rank (all ranks must skip a bad step together)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    criterion: MultiBoxLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainState,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    channels_last: bool = False,
    max_bad_steps: int = 20,
    on_step: Callable[[int, EpochStats], None] | None = None,
    freeze_bn: bool = False,
) -> EpochStats:
    """One pass over ``loader`` (batches from :func:`fssd.data.detection_collate`).

    A step whose loss is NaN/Inf on any rank is skipped on all ranks (BatchNorm statistics
    restored) and counted; after
    ``max_bad_steps`` consecutive bad steps :class:`BadStepsError` is raised. ``freeze_bn`` keeps
    BatchNorm layers in eval mode (fixed running statistics). Returns the epoch's averages
    (local to this rank).
    """
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if freeze_bn:
        for m in bns:
            m.eval()
    # BatchNorm statistics that a skipped (non-finite) step must not leave behind.
    tracked = [m for m in bns if m.training and m.track_running_stats]
    stats = EpochStats()
    sums = torch.zeros(3, dtype=torch.float64)
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        images = batch["images"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        boxes = batch["boxes"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in tracked]
        with _autocast(device, amp_dtype):
            loc, conf = model(images)
        ignore = batch.get("ignore")
        out = criterion(loc.float(), conf.float(), boxes, labels,
                        ignore.to(device, non_blocking=True) if ignore is not None else None)
        loss = out.total
        if not _all_finite(loss):
            with torch.no_grad():
                for m, (mean, var, count) in zip(tracked, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)
            optimizer.zero_grad(set_to_none=True)
            state.consecutive_bad += 1
            state.bad_steps += 1
            stats.bad_steps += 1
            if state.consecutive_bad >= max_bad_steps:
                raise BadStepsError(
                    f"{state.consecutive_bad} consecutive steps had a non-finite loss (last at step {state.step}); "
                    "lower train.lr, raise train.warmup_epochs or check the data; the last good checkpoint is kept"
                )
            continue
        state.consecutive_bad = 0
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        stats.lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        state.step += 1
        n = images.shape[0]
        sums += torch.tensor([out.loc.item() * n, out.conf.item() * n, float(n)], dtype=torch.float64)
        stats.steps += 1
        stats.images += n
        if on_step is not None:
            stats.seconds = time.perf_counter() - start
            on_step(i, stats)
    stats.seconds = time.perf_counter() - start
    if sums[2] > 0:
        stats.loss_loc = float(sums[0] / sums[2])
        stats.loss_conf = float(sums[1] / sums[2])
        stats.loss = stats.loss_loc + stats.loss_conf
    return stats


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    top_k_per_class: int | None = 200,
    max_detections: int = 200,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    category_ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Detections in the COCO results format, boxes in original-image pixels.

    ``category_ids[label - 1]`` maps a network label to the dataset's category id (default:
    the label itself). Each rank predicts the batches its loader yields; gather across
    ranks with :func:`gather_detections`.
    """
    net = unwrap(model)
    net.eval()
    priors = net.priors
    variances = net.prior_config.variances
    results: list[dict[str, Any]] = []
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            loc, conf = net(images)
        dets = postprocess(
            loc.float(), conf.float(), priors, image_sizes=batch["orig_sizes"].to(device), variances=variances,
            score_threshold=score_threshold, nms_threshold=nms_threshold,
            top_k_per_class=top_k_per_class, max_detections=max_detections,
        )
        for image_id, det in zip(batch["image_ids"].tolist(), dets):
            b = det["boxes"].cpu()
            xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
            for box, score, label in zip(xywh, det["scores"].cpu().tolist(), det["labels"].cpu().tolist()):
                cat = category_ids[label - 1] if category_ids is not None else label
                results.append({"image_id": image_id, "category_id": cat, "bbox": [round(v, 3) for v in box],
                                "score": round(score, 5)})
    return results


def gather_detections(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' detections on every rank (duplicates from padded samplers removed)."""
    if not _distributed():
        return results
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    seen: set[tuple] = set()
    merged = []
    for part in parts:
        for r in part:
            key = (r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])
            if key not in seen:
                seen.add(key)
                merged.append(r)
    return merged
