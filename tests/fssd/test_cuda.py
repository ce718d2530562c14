"""CUDA tests (marker ``cuda``): mixed precision, channels_last, SyncBatchNorm, EMA and checkpoints,
post-processing and the Predictor on a GPU.

Where no GPU is present (CI, laptops) every test here skips with the reason "needs a CUDA GPU"
and its name, so the run stays green and the summary (``-rs``, on by default through ``-ra``)
lists what was not run. ``scripts/gpu_check.sh`` runs them on a GPU machine (only torch,
torchvision, numpy and opencv need to be installed there; the rest travels as wheels), and
``pytest -m cuda`` selects them alone.

Tolerances, stated once (the lite preset at 128 px, batch 8, 3 objects per image, SGD lr 0.01,
momentum 0.9, four steps; the fp32 reference runs with TF32 off). Calibrated with the same bf16/fp16
formats under CPU autocast (torch 2.15), where fp32 and mixed precision differed by 4e-4 (bf16) and
6e-4 (fp16) in the per-step losses, 1.8e-3 and 8e-4 in the held-out loss, and the first updates had
cosine similarities 0.959 and 0.994:

- bf16 autocast: every step's training loss and the fp32 loss of the trained weights on a held-out
  batch (BatchNorm on batch statistics) within 1 % (relative) of fp32 training; cosine similarity of
  the first step's parameter update >= 0.9; training moved the held-out loss by more than 3 %.
  Parameter-by-parameter agreement is not a useful criterion: behind the lite backbone's BatchNorms,
  gradients at initialisation nearly cancel and bf16 rounding moves them by tens of percent while
  the function trained stays the same.
- fp16 with a GradScaler: 0.5 % and cosine >= 0.97, and no step skipped for overflow.
- channels_last (fp32): outputs within 1e-4; losses within 1e-4 (relative), first-update cosine >= 0.99.
- post-processing and the Predictor, CUDA against CPU in fp32: at least 98 % of the detections have a
  twin (same label, box within 0.01 px, score within 1e-5 / 1e-4); a near-tie at the NMS threshold or
  at the 200-per-image cut costs one detection, not the test.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fssd import MultiBoxLoss, build_fssd, load_checkpoint, load_model, postprocess, save_checkpoint
from fssd.config import DetectorConfig
from fssd.engine import LRSchedule, TrainState, make_ema, param_groups, train_one_epoch

pytestmark = pytest.mark.cuda

CUDA = torch.cuda.is_available()
SIZE = 128
CLASSES = ["circle", "square", "triangle"]

# bounds stated in the module docstring
BF16_LOSS_RTOL, BF16_MIN_COSINE = 1e-2, 0.9
FP16_LOSS_RTOL, FP16_MIN_COSINE = 5e-3, 0.97
CL_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    if not CUDA:
        pytest.skip(f"needs a CUDA GPU (torch.cuda.is_available() is False): {request.node.name}")


@pytest.fixture
def ieee_fp32():
    """fp32 means fp32: no TF32 in cuDNN convolutions or matmuls, deterministic cuDNN algorithms.
    (The legacy flags: they set convolutions and RNNs alike, so the legacy getters keep working.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = False, True, False, False
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved


# ------------------------------------------------------------------------------------------------
# helpers (device-agnostic)


def _batches(n: int, *, batch: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` training batches: noise images, 3 random boxes per image (normalised x1y1x2y2), labels 1..3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, SIZE, SIZE, generator=g)
        xy = torch.rand(batch, 3, 2, generator=g) * 0.5
        wh = 0.1 + torch.rand(batch, 3, 2, generator=g) * 0.4
        out.append({
            "images": images,
            "boxes": torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1),
            "labels": torch.randint(1, len(CLASSES) + 1, (batch, 3), generator=g),
        })
    return out


def _lite(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_fssd("fssd_lite", len(CLASSES) + 1, input_size=SIZE)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _eval_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """The fp32 MultiBox loss of ``model`` on one batch, BatchNorm on batch statistics (train mode, on a
    copy: running statistics after four steps are still mostly their initial values)."""
    model = copy.deepcopy(model).to(device).train()
    crit = MultiBoxLoss(model.priors)
    with torch.no_grad():
        loc, conf = model(batch["images"].to(device))
        return float(crit(loc.float(), conf.float(), batch["boxes"].to(device), batch["labels"].to(device)).total)


def _train(model: nn.Module, batches, device: torch.device, *, amp_dtype=None, scaler=None, channels_last=False,
           grad_clip=None) -> dict:
    """Train a copy of ``model`` one step per batch through ``fssd.engine.train_one_epoch``; returns the
    per-step losses, the first step's parameter update, the trained model and the skipped steps."""
    model = copy.deepcopy(model).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    crit = MultiBoxLoss(model.priors)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    state = TrainState()
    start = _flat(model)
    losses, first_update, bad = [], None, 0
    for batch in batches:
        stats = train_one_epoch(model, [batch], crit, opt, None, state, device=device, amp_dtype=amp_dtype,
                                scaler=scaler, grad_clip=grad_clip, channels_last=channels_last)
        losses.append(stats.loss)
        bad += stats.bad_steps
        if first_update is None:
            first_update = _flat(model) - start
    return {"losses": losses, "first_update": first_update, "model": model, "bad_steps": bad}


def _conv_output_dtypes(model: nn.Module) -> tuple[list[torch.dtype], object]:
    seen: list[torch.dtype] = []
    conv = model.pyramid[0][0]
    return seen, conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))


def _compare_mixed_precision(amp_dtype, scaler, loss_rtol, min_cosine, device):
    base = _lite()
    batches = _batches(4)
    held_out = _batches(1, seed=99)[0]
    ref = _train(base, batches, device)
    amp = _train(base, batches, device, amp_dtype=amp_dtype, scaler=scaler, grad_clip=1e6 if scaler else None)
    assert ref["bad_steps"] == 0 and amp["bad_steps"] == 0
    for i, (a, r) in enumerate(zip(amp["losses"], ref["losses"])):
        assert abs(a - r) <= loss_rtol * r, f"step {i + 1}: {amp_dtype} loss {a:.5f} vs fp32 {r:.5f}"
    cos = _cosine(amp["first_update"], ref["first_update"])
    assert cos >= min_cosine, f"first update: cosine {cos:.4f} between {amp_dtype} and fp32 < {min_cosine}"
    initial = _eval_loss(base, held_out, device)
    trained_ref = _eval_loss(ref["model"], held_out, device)
    trained_amp = _eval_loss(amp["model"], held_out, device)
    assert abs(trained_amp - trained_ref) <= loss_rtol * trained_ref, (trained_amp, trained_ref)
    # the agreement means something: training moved the held-out loss by much more than the tolerance
    assert initial - trained_ref > 3 * loss_rtol * initial, (initial, trained_ref)
    return amp


# ------------------------------------------------------------------------------------------------
# training numerics


def test_bf16_autocast_train_step_agrees_with_fp32(ieee_fp32):
    device = torch.device("cuda")
    amp = _compare_mixed_precision(torch.bfloat16, None, BF16_LOSS_RTOL, BF16_MIN_COSINE, device)
    # autocast really ran: the trained model's convolutions give bf16 under the engine's autocast
    dtypes, hook = _conv_output_dtypes(amp["model"])
    try:
        train_one_epoch(amp["model"], _batches(1, seed=5), MultiBoxLoss(amp["model"].priors),
                        torch.optim.SGD(amp["model"].parameters(), lr=0.0), None, TrainState(), device=device,
                        amp_dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16]


def test_fp16_with_grad_scaler_train_step_agrees_with_fp32(ieee_fp32):
    device = torch.device("cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    amp = _compare_mixed_precision(torch.float16, scaler, FP16_LOSS_RTOL, FP16_MIN_COSINE, device)
    assert amp["bad_steps"] == 0
    assert scaler.get_scale() == 2.0**10, "the scaler backed off: a step was skipped for inf/NaN gradients"


def test_channels_last_gives_the_same_outputs_and_training(ieee_fp32):
    device = torch.device("cuda")
    base = _lite().to(device).eval()
    fast = copy.deepcopy(base).to(memory_format=torch.channels_last)
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _batches(1)[0]["images"].to(device)
    with torch.no_grad():
        loc, conf = base(x)
        loc_cl, conf_cl = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loc_cl, loc, rtol=CL_RTOL, atol=CL_RTOL)
    torch.testing.assert_close(conf_cl, conf, rtol=CL_RTOL, atol=CL_RTOL)

    batches = _batches(2)
    plain = _train(_lite(), batches, device)
    cl = _train(_lite(), batches, device, channels_last=True)
    for a, r in zip(cl["losses"], plain["losses"]):
        assert abs(a - r) <= CL_RTOL * r, (a, r)
    assert _cosine(cl["first_update"], plain["first_update"]) >= 0.99
    assert next(m for m in cl["model"].modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last), "the optimizer step lost the channels_last layout"
    # and the production combination, bf16 + channels_last, trains like bf16 alone
    bf16 = _train(_lite(), batches, device, amp_dtype=torch.bfloat16)
    bf16_cl = _train(_lite(), batches, device, amp_dtype=torch.bfloat16, channels_last=True)
    for a, r in zip(bf16_cl["losses"], bf16["losses"]):
        assert abs(a - r) <= BF16_LOSS_RTOL * r, (a, r)


# ------------------------------------------------------------------------------------------------
# SyncBatchNorm


def test_sync_batchnorm_in_a_one_process_group(ieee_fp32, tmp_path):
    """What `train.sync_bn: true` does in a Ray Train GPU worker, in a 1-process NCCL group: the converted
    model trains through DDP exactly like plain BatchNorm, and torch's SyncBatchNorm CUDA kernels (which
    a 1-process group bypasses inside the module) give batch_norm's outputs, statistics and gradients."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device("cuda")
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        base = _lite()
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)).to(device)
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == n_bn > 0
        ddp = DistributedDataParallel(sync, device_ids=[device.index or 0])
        batches = _batches(2)
        crit = MultiBoxLoss(sync.priors, distributed=True)
        opt = torch.optim.SGD(param_groups(sync, 5e-4), lr=0.01, momentum=0.9)
        losses = [train_one_epoch(ddp, [b], crit, opt, None, TrainState(), device=device).loss for b in batches]
        ref = _train(base, batches, device)
        for a, r in zip(losses, ref["losses"]):
            assert abs(a - r) <= 1e-4 * r, (a, r)
        for (name, a), b in zip(sync.state_dict().items(), ref["model"].state_dict().values()):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=f"{name} differs")

        # the kernels themselves (batch_norm_stats / gather_stats_with_counts / backward_reduce / elemt)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(8, 16, 10, 10, generator=g) * 3 + 1).to(device).requires_grad_()
        w = torch.rand(16, generator=g).add(0.5).to(device).requires_grad_()
        b = torch.randn(16, generator=g).to(device).requires_grad_()
        up = torch.randn(8, 16, 10, 10, generator=g).to(device)
        rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
        out = SyncBNFunction.apply(x, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
        (out * up).sum().backward()
        grads = [t.grad.clone() for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        rm2, rv2 = torch.zeros(16, device=device), torch.ones(16, device=device)
        out2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.1, eps=1e-5)
        (out2 * up).sum().backward()
        torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rm, rm2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rv, rv2, rtol=1e-4, atol=1e-6)
        for got, want in zip(grads, (x.grad, w.grad, b.grad)):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# EMA and checkpoints


def _training_state(model, opt, sched, scaler, ema, state, epoch):
    """The ``training`` payload the pipeline's Ray worker saves (pipeline/train.py)."""
    return {
        "epoch": epoch,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict(),
        "state": dataclasses.asdict(state),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def test_ema_and_checkpoint_save_resume_on_the_device(ieee_fp32, tmp_path):
    """Save after 2 steps (weights = EMA, raw weights + optimizer/scheduler/scaler/EMA state in
    ``training``), load on the GPU, train 2 more: the same as 4 uninterrupted steps."""
    device = torch.device("cuda")
    batches = _batches(4)

    def fresh(seed):
        model = _lite(seed).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
        sched = LRSchedule(4, warmup_iters=2).scheduler(opt)
        # growth every step: the scale changes, so its state must round-trip; powers of two keep fp32 exact
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=1)
        ema = make_ema(model, decay=0.9)
        return model, opt, sched, scaler, ema, TrainState()

    def run(parts, batch_list):
        model, opt, sched, scaler, ema, state = parts
        crit = MultiBoxLoss(model.priors)
        for b in batch_list:
            train_one_epoch(model, [b], crit, opt, sched, state, device=device, scaler=scaler, ema=ema,
                            channels_last=True)

    a = fresh(0)
    run(a, batches[:2])
    model, opt, sched, scaler, ema, state = a
    assert ema.n_averaged.device.type == "cuda" and ema.n_averaged.item() == 2
    assert all(p.device.type == "cuda" for p in ema.module.parameters())
    path = tmp_path / "fssd.pt"
    cfg = DetectorConfig(model=model.config, priors=model.prior_config)
    save_checkpoint(path, ema.module, cfg, CLASSES, training=_training_state(model, opt, sched, scaler, ema, state, 0))
    saved_ema = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
    run(a, batches[2:])

    payload = load_checkpoint(path, map_location=device)
    tr = payload["training"]
    b = fresh(1)
    model_b, opt_b, sched_b, scaler_b, ema_b, _ = b
    model_b.load_state_dict(tr["model"])
    opt_b.load_state_dict(tr["optimizer"])
    sched_b.load_state_dict(tr["scheduler"])
    scaler_b.load_state_dict(tr["scaler"])
    ema_b.load_state_dict(tr["ema"])
    b = (model_b, opt_b, sched_b, scaler_b, ema_b, TrainState(**tr["state"]))
    assert scaler_b.get_scale() == 2.0**12 and sched_b.last_epoch == 2
    momentum = next(iter(opt_b.state.values()))["momentum_buffer"]
    assert momentum.device.type == "cuda"
    run(b, batches[2:])

    assert b[5].step == a[5].step == 4 and ema_b.n_averaged.item() == ema.n_averaged.item() == 4
    assert scaler_b.get_scale() == scaler.get_scale() == 2.0**14
    for (name, x), y in zip(model.state_dict().items(), model_b.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=f"resumed {name} differs")
    for (name, x), y in zip(ema.module.state_dict().items(), ema_b.module.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=f"resumed EMA {name} differs")
    # the checkpoint's weights are the EMA's, and load_model rebuilds them on the GPU
    loaded, _ = load_model(path, map_location=device)
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v.cpu(), saved_ema[k]), k
    assert not torch.equal(saved_ema["conf_head.0.weight"], tr["model"]["conf_head.0.weight"])


# ------------------------------------------------------------------------------------------------
# post-processing and the Predictor


def _as_np(d: dict) -> list[np.ndarray]:
    return [np.asarray(d[k].cpu() if isinstance(d[k], torch.Tensor) else d[k], dtype=np.float64)
            for k in ("boxes", "scores", "labels")]


def _found(a: dict, b: dict, box_atol: float, score_atol: float) -> float:
    """Fraction of ``a``'s detections that have a twin in ``b``: same label, every box coordinate
    within ``box_atol`` and the score within ``score_atol``."""
    (ba, sa, la), (bb, sb, lb) = _as_np(a), _as_np(b)
    if len(sa) == 0:
        return 1.0
    if len(sb) == 0:
        return 0.0
    close = ((np.abs(ba[:, None, :] - bb[None, :, :]).max(-1) <= box_atol)
             & (np.abs(sa[:, None] - sb[None, :]) <= score_atol) & (la[:, None] == lb[None, :]))
    return float(close.any(1).mean())


def _match_fraction(a: dict, b: dict, box_atol: float, score_atol: float) -> float:
    """Both ways: set-based, so a near-tie in NMS (an IoU within rounding of the threshold) costs
    one detection, not the comparison of everything ranked after it."""
    return min(_found(a, b, box_atol, score_atol), _found(b, a, box_atol, score_atol))


def _fssd300_outputs(images: int, seed: int = 0):
    """Random FSSD300 outputs shaped like a trained model's (mostly background: ~2k candidates/image)."""
    priors = build_fssd("fssd300_vgg16", 21).priors
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(images, priors.shape[0], 4, generator=g) * 0.5
    conf = torch.randn(images, priors.shape[0], 21, generator=g) * 2.0
    conf[..., 0] += 6.0
    return loc, conf, priors


@pytest.mark.parametrize("kwargs", [{}, {"plus_one": True, "pre_nms_top_k": None}], ids=["default", "authors"])
def test_postprocess_on_cuda_returns_the_cpu_detections(kwargs):
    loc, conf, priors = _fssd300_outputs(4)
    sizes = [(300, 300), (375, 500), (480, 640), (333, 250)]
    cpu = postprocess(loc, conf, priors, image_sizes=sizes, **kwargs)
    gpu = postprocess(loc.cuda(), conf.cuda(), priors.cuda(), image_sizes=sizes, **kwargs)
    assert len(gpu) == len(cpu) == 4
    for i, (c, d) in enumerate(zip(cpu, gpu)):
        assert d["boxes"].device.type == "cuda"
        assert len(c["scores"]) > 20, "the test data should give detections"
        assert abs(len(d["scores"]) - len(c["scores"])) <= max(2, len(c["scores"]) // 50), i
        frac = _match_fraction(c, d, box_atol=1e-2, score_atol=1e-5)
        assert frac >= 0.98, f"image {i}: only {frac:.3f} of the detections agree"
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])


def _predictor_checkpoint(path: Path) -> None:
    """A lite FSSD with random weights whose scores vary from prior to prior (no saturated ties)."""
    model = _lite(3)
    with torch.no_grad():
        for head, a in zip(model.conf_head, model.prior_config.anchors_per_location):
            head.weight.mul_(10.0)
            head.bias.view(a, len(CLASSES) + 1)[:, 1] += 1.0
        for head in model.loc_head:
            head.weight.mul_(3.0)
    save_checkpoint(path, model, DetectorConfig(model=model.config, priors=model.prior_config), CLASSES)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((120, 150), (200, 90), (128, 128))]


def test_predictor_on_cuda(ieee_fp32, tmp_path):
    from fssd.predictor import Predictor

    path = tmp_path / "fssd.pt"
    _predictor_checkpoint(path)
    images = _images()
    cpu = Predictor.from_checkpoint(path, device="cpu", amp=False).predict(images)
    fp32 = Predictor.from_checkpoint(path, device="cuda", amp=False)
    assert fp32.amp_dtype is None and all(p.device.type == "cuda" for p in fp32.model.parameters())
    fp32_cl = Predictor.from_checkpoint(path, device="cuda", amp=False, channels_last=True)
    for name, gpu in (("fp32", fp32.predict(images, batch_size=2)), ("fp32 channels_last", fp32_cl.predict(images))):
        for i, (c, d) in enumerate(zip(cpu, gpu)):
            assert isinstance(d["boxes"], np.ndarray) and d["boxes"].dtype == np.float32
            assert len(c["scores"]) > 5
            frac = _match_fraction(c, d, box_atol=1e-2, score_atol=1e-4)
            assert frac >= 0.98, f"{name}, image {i}: only {frac:.3f} of the detections agree with the CPU's"
    # the default on CUDA: bf16 autocast; the same objects, at bf16's precision
    bf16 = Predictor.from_checkpoint(path, device="cuda")
    assert bf16.amp_dtype == torch.bfloat16
    for i, (c, d) in enumerate(zip(cpu, bf16.predict(images))):
        assert np.isfinite(d["boxes"]).all() and (np.diff(d["scores"]) <= 0).all()
        assert set(d["names"]) <= set(CLASSES)
        top = {k: v[:5] for k, v in c.items() if k != "names"}
        frac = _found(top, d, box_atol=2.0, score_atol=0.05)
        assert frac >= 0.6, f"bf16, image {i}: only {frac:.2f} of the 5 best CPU detections found"
