"""BatchNorm across DDP ranks on CPU (gloo), with ``freeze_bn`` off: synchronised BatchNorm makes
W ranks x b images train exactly like 1 rank x W*b images; per-rank BatchNorm does not.

The companion of ``tests/pipeline/test_train.py::test_two_workers_match_one_worker_with_double_batch``
(Ray Train, ``train.freeze_bn: true``). torch's ``nn.SyncBatchNorm`` cannot run on CPU: its forward
raises ValueError for CPU tensors and its kernels (``torch.batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ...) exist for CUDA only, which is why ``train.sync_bn``
needs ``train.use_gpu``. So this test checks the rule those kernels implement, with
:class:`GlooSyncBatchNorm2d` below: the batch statistics are the mean and biased variance over all
ranks' images (sums all-reduced), the running variance takes the unbiased variance over the global
count, and the backward all-reduces the statistics' gradients (``torch.distributed.nn``'s
autograd-aware all_reduce; SyncBatchNorm all-reduces ``sum_dy`` and ``sum_dy_xmu``, the same sums).
``tests/fssd/test_cuda.py::test_sync_batchnorm_in_a_one_process_group`` checks the CUDA kernels
against ``batch_norm`` on a GPU.

Two forked worker processes run the DDP side; the 1-rank reference runs in the test process.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fssd import MultiBoxLoss, build_fssd
from fssd.engine import TrainState, param_groups, train_one_epoch

WORLD = 2
PER_RANK = 4
STEPS = 2
SIZE = 64


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics span every rank of the default process group
    (any backend, CPU tensors); plain BatchNorm2d without a process group or in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import _AllReduce  # all_reduce() itself warns it is deprecated

        c = x.shape[1]
        xd = x.double()
        local = torch.cat([xd.sum(dim=(0, 2, 3)), (xd * xd).sum(dim=(0, 2, 3)),
                           xd.new_tensor([x.numel() // c])])
        total = _AllReduce.apply(dist.ReduceOp.SUM, dist.group.WORLD, local)  # differentiable SUM over ranks
        count = total[2 * c]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean * mean  # biased, as batch_norm normalises with
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * (var * count / (count - 1)).to(self.running_var.dtype))
        shape = (1, c, 1, 1)
        y = (xd - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        return (y * self.weight.double().view(shape) + self.bias.double().view(shape)).to(x.dtype)


def convert_to_gloo_sync(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a GlooSyncBatchNorm2d carrying the same parameters and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm2d):
            new = GlooSyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_to_gloo_sync(child)
    return module


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_fssd("fssd_lite", 4, input_size=SIZE, fusion_channels=8)


def _global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    n = WORLD * PER_RANK
    for _ in range(STEPS):
        xy = torch.rand(n, 2, 2, generator=g) * 0.5
        wh = 0.15 + torch.rand(n, 2, 2, generator=g) * 0.35
        out.append({"images": torch.randn(n, 3, SIZE, SIZE, generator=g) * 2 + 0.5,
                    "boxes": torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1),
                    "labels": torch.randint(1, 4, (n, 2), generator=g)})
    return out


def _train(model: nn.Module, batches, *, freeze_bn: bool, distributed: bool = False) -> nn.Module:
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model)
    # every background prior is a negative: hard-negative mining breaks exact ties among equal background
    # losses (priors of the 1x1 levels at initialisation) by rounding-level differences, which would turn
    # the reduction order of the statistics into a different choice of negatives
    crit = MultiBoxLoss(model.priors, distributed=distributed, neg_pos_ratio=1e6)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.05, momentum=0.9)
    train_one_epoch(net, batches, crit, opt, None, TrainState(), device=torch.device("cpu"), freeze_bn=freeze_bn)
    return model


MODES = {  # mode: (BatchNorm synchronised across ranks, freeze_bn)
    "sync": (True, False),
    "local": (False, False),
    "frozen": (False, True),
}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        shard = [{k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in b.items()} for b in _global_batches()]
        for mode, (sync, freeze) in MODES.items():
            model = _model()
            if sync:
                convert_to_gloo_sync(model)
            _train(model, shard, freeze_bn=freeze, distributed=True)
            if rank == 0:
                torch.save(model.state_dict(), Path(out_dir) / f"{mode}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The DDP side in WORLD forked processes (fork: no second import of torch and fssd)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]} (tracebacks above)"
    return {mode: torch.load(tmp_path / f"{mode}.pt", weights_only=True) for mode in MODES}


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> tuple[float, str]:
    worst, where = 0.0, ""
    for k in keys:
        d = float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12))
        if d > worst:
            worst, where = d, k
    return worst, where


def test_sync_batchnorm_ranks_match_one_rank_with_the_whole_batch(tmp_path):
    ranks = _run_ranks(tmp_path)
    batches = _global_batches()
    reference = {freeze: _train(_model(), batches, freeze_bn=freeze).state_dict() for freeze in (False, True)}
    floats = [k for k, v in reference[False].items() if v.is_floating_point()]
    bn_stats = [k for k in floats if k.endswith(("running_mean", "running_var"))]
    assert bn_stats, "the lite model has BatchNorm layers"

    # synchronised BatchNorm, freeze_bn off: parameters and running statistics as with one rank
    sync = ranks["sync"]
    for k in floats:
        torch.testing.assert_close(sync[k], reference[False][k], rtol=1e-4, atol=1e-6, msg=f"{k} differs")
    # per-rank BatchNorm, freeze_bn off: normalised with 4-image statistics, a different model
    worst, where = _max_rel_diff(ranks["local"], reference[False], floats)
    assert worst > 1e-3, f"per-rank BatchNorm should differ from the whole batch's (largest difference {worst} in {where})"
    # per-rank BatchNorm, freeze_bn on: fixed statistics, the equivalence holds again
    for k in floats:
        torch.testing.assert_close(ranks["frozen"][k], reference[True][k], rtol=1e-4, atol=1e-6, msg=f"{k} differs")
    assert all(torch.equal(ranks["frozen"][k], _model().state_dict()[k]) for k in bn_stats)
