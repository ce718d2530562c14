"""GPU bench: FSSD300-VGG16 (this library) next to torchvision's ``ssd300_vgg16``, measured in the same run.

    python bench/bench_gpu.py [--out-dir DIR] [--budget-s S]     # on a machine with a CUDA GPU
    python bench/bench_gpu.py --dry-run [--out-dir DIR]          # CPU, tiny sizes: checks the code paths

Rows (bf16 autocast, channels_last, ``cudnn.benchmark``, 300x300 inputs, 21 classes, random weights):

- training img/s at batch 32 and 64: FSSD through ``fssd.engine.train_one_epoch`` (the pipeline's loop:
  MultiBox loss with hard-negative mining, the non-finite check, SGD with momentum and weight decay),
  torchvision through ``SSD.forward(images, targets)`` (its transform, matching and loss) and the same
  SGD step. Batches already on the GPU: data loading is not measured (see README's "GPU clusters").
- inference img/s at batch 64 including post-processing, detections delivered on the host: FSSD through
  ``fssd.predictor.Predictor.predict_batch`` (network, ``fssd.postprocess``: softmax, score > 0.01,
  top-400 per class, batched NMS at 0.45, 200 per image; numpy results), torchvision through
  ``SSD.forward(images)`` in eval mode (transform, network, its per-image/per-class
  ``postprocess_detections`` with the same thresholds) and the results copied to the host.
- batch-1 latency (median ms over many runs), the same two paths with one image.

Random weights would score every (prior, class) pair near 1/21 > 0.01 and benchmark NMS on 170,000
candidates per image; both models' background logits are therefore shifted (one bias per model,
found by bisection) so that each image gives about 2,000 candidates above the score threshold, what
a trained detector gives. The table states the candidates per image each model got.

Each figure is the best of ``--repeats`` timed runs after warm-up (CUDA synchronised). The Markdown
table (and a JSON twin) is printed and, with ``--out-dir``, written to ``gpu_bench.md`` /
``gpu_bench.json`` after every row, so a run stopped by a time limit keeps what it measured.
``scripts/gpu_check.sh`` runs this after the ``cuda`` tests.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fssd import MultiBoxLoss, build_fssd  # noqa: E402
from fssd.engine import TrainState, param_groups, train_one_epoch  # noqa: E402

NUM_CLASSES = 21  # VOC: 20 classes + background
SIZE = 300  # input side; --dry-run uses DRY_SIZE
DRY_SIZE = 128
CANDIDATES_PER_IMAGE = 2000
SCORE_THRESHOLD = 0.01
TARGETS = {  # the speed targets on an H100/H200
    "train": ("FSSD300 training >= 1000 img/s (bf16)", 1000.0),
    "infer": ("FSSD300 inference >= 2500 img/s at batch 64 incl. post-processing (NMS)", 2500.0),
}


# ------------------------------------------------------------------------------------------------
# settings


class Settings:
    def __init__(self, dry_run: bool, device: torch.device, repeats: int | None) -> None:
        self.dry_run = dry_run
        self.device = device
        self.size = DRY_SIZE if dry_run else SIZE
        if dry_run:
            self.train_batches, self.infer_batch = (2, 3), 2
            self.train_iters, self.infer_iters, self.latency_runs = 1, 1, 2
            self.warmup, self.repeats = 1, repeats or 1
        else:
            self.train_batches, self.infer_batch = (32, 64), 64
            self.train_iters, self.infer_iters, self.latency_runs = 10, 10, 50
            self.warmup, self.repeats = 5, repeats or 3
        # bf16 autocast on CUDA only (CPU bf16 convolutions are orders of magnitude slower than fp32)
        self.amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(run: Callable[[], None], images: int, s: Settings) -> float:
    """images/s: best of ``s.repeats`` timed calls of ``run`` (each processing ``images`` images)."""
    best = math.inf
    for _ in range(s.repeats):
        _sync(s.device)
        t = time.perf_counter()
        run()
        _sync(s.device)
        best = min(best, time.perf_counter() - t)
    return images / best


def _median_ms(run: Callable[[], None], s: Settings) -> float:
    times = []
    for _ in range(s.latency_runs):
        _sync(s.device)
        t = time.perf_counter()
        run()
        _sync(s.device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# models


class _TinyBackbone(nn.Module):
    """--dry-run only: a two-map backbone for torchvision's SSD class (the real ssd300_vgg16 takes
    seconds per step on a CPU); every other part of torchvision's SSD path runs as with VGG16."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> OrderedDict:
        a = self.a(x)
        return OrderedDict([("0", a), ("1", self.b(a))])


def build_models(s: Settings) -> tuple[nn.Module, nn.Module, str, str]:
    from torchvision.models.detection import ssd300_vgg16
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    torch.manual_seed(0)
    if s.dry_run:
        # small models at 128 px (VGG16 at 300 px takes seconds per step on a CPU): the bench's code
        # paths (engine, Predictor, postprocess; torchvision's SSD transform, loss and postprocess) all run
        fssd_model = build_fssd("fssd_lite", NUM_CLASSES, input_size=s.size)
        tv = SSD(_TinyBackbone(), DefaultBoxGenerator([[2], [2, 3]]), (s.size, s.size), NUM_CLASSES,
                 image_mean=[0.48235, 0.45882, 0.40784], image_std=[1.0 / 255.0] * 3)
        names = (f"fssd_lite {s.size} px (dry run)", f"torchvision SSD, tiny backbone, {s.size} px (dry run)")
    else:
        fssd_model = build_fssd("fssd300_vgg16", NUM_CLASSES)
        tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
        names = ("FSSD300-VGG16 (fssd)", "torchvision ssd300_vgg16")
    for m in (fssd_model, tv):
        m.to(s.device).to(memory_format=torch.channels_last)
    return fssd_model, tv, names[0], names[1]


def _background_shift(conf: torch.Tensor, target: float) -> float:
    """The shift of the background logit that leaves ``target`` (prior, class) pairs per image scoring
    above SCORE_THRESHOLD (bisection; conf [N, P, C] logits)."""
    conf = conf.float()

    def count(shift: float) -> float:
        c = conf.clone()
        c[..., 0] += shift
        return float((torch.softmax(c, dim=-1)[..., 1:] > SCORE_THRESHOLD).sum()) / conf.shape[0]

    lo, hi = -10.0, 40.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if count(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _shift_background(heads: nn.ModuleList, anchors: list[int], shift: float) -> None:
    with torch.no_grad():
        for head, a in zip(heads, anchors):
            head.bias.view(a, NUM_CLASSES)[:, 0] += shift


def calibrate(fssd_model: nn.Module, tv: nn.Module, s: Settings) -> dict[str, float]:
    """Shift both models' background logits to ~CANDIDATES_PER_IMAGE candidates per image."""
    n = 4
    x = torch.randn(n, 3, s.size, s.size, device=s.device).contiguous(memory_format=torch.channels_last)
    raw = [torch.rand(3, s.size, s.size, device=s.device) for _ in range(n)]
    fssd_model.eval()
    tv.eval()
    with torch.inference_mode(), s.autocast():
        conf = fssd_model(x)[1]
        shift = _background_shift(conf, CANDIDATES_PER_IMAGE)
    _shift_background(fssd_model.conf_head, list(fssd_model.prior_config.anchors_per_location), shift)

    heads = tv.head.classification_head.module_list
    anchors = [h.out_channels // NUM_CLASSES for h in heads]
    with torch.inference_mode(), s.autocast():
        images, _ = tv.transform(raw)
        features = tv.backbone(images.tensors)
        features = list(features.values()) if isinstance(features, dict) else [features]
        tv_conf = tv.head(features)["cls_logits"]
        tv_shift = _background_shift(tv_conf, CANDIDATES_PER_IMAGE)
    _shift_background(heads, anchors, tv_shift)

    with torch.inference_mode(), s.autocast():
        after = fssd_model(x)[1].float()
        tv_after = tv.head(features)["cls_logits"].float()
    cand = {
        "fssd": float((torch.softmax(after, -1)[..., 1:] > SCORE_THRESHOLD).sum()) / n,
        "torchvision": float((torch.softmax(tv_after, -1)[..., 1:] > SCORE_THRESHOLD).sum()) / n,
    }
    return cand


# ------------------------------------------------------------------------------------------------
# measurements


def _targets(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 boxes per image (normalised x1y1x2y2) and labels 1..20."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 3, 2, generator=g) * 0.6
    wh = 0.1 + torch.rand(n, 3, 2, generator=g) * 0.3
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)
    labels = torch.randint(1, NUM_CLASSES, (n, 3), generator=g)
    return boxes.to(device), labels.to(device)


def train_fssd(model: nn.Module, batch: int, s: Settings) -> float:
    model.train()
    boxes, labels = _targets(batch, s.device)
    data = {"images": torch.randn(batch, 3, s.size, s.size, device=s.device), "boxes": boxes, "labels": labels}
    crit = MultiBoxLoss(model.priors)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=1e-4, momentum=0.9)
    state = TrainState()

    def run(iters: int) -> None:
        train_one_epoch(model, [data] * iters, crit, opt, None, state, device=s.device, amp_dtype=s.amp_dtype,
                        channels_last=True)

    run(s.warmup)
    return _best_rate(lambda: run(s.train_iters), batch * s.train_iters, s)


def train_torchvision(model: nn.Module, batch: int, s: Settings) -> float:
    model.train()
    boxes, labels = _targets(batch, s.device)
    images = [torch.rand(3, s.size, s.size, device=s.device) for _ in range(batch)]
    targets = [{"boxes": b * s.size, "labels": lab} for b, lab in zip(boxes, labels)]
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=1e-4, momentum=0.9)

    def run(iters: int) -> None:
        for _ in range(iters):
            with s.autocast():
                losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # a training loop logs its loss (the fssd engine syncs once per step too)

    run(s.warmup)
    return _best_rate(lambda: run(s.train_iters), batch * s.train_iters, s)


def _fssd_predictor(model: nn.Module, s: Settings):
    from fssd.predictor import Predictor

    return Predictor(model, [f"class{i}" for i in range(1, NUM_CLASSES)], device=s.device, score_threshold=SCORE_THRESHOLD,
                     nms_threshold=0.45, pre_nms_top_k=400, top_k_per_class=200, max_detections=200,
                     amp=s.amp_dtype is not None, amp_dtype=s.amp_dtype or torch.bfloat16, channels_last=True)


def _tv_to_host(outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    return [{k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in o.items()}
            for o in outputs]


def infer_fssd(model: nn.Module, batch: int, s: Settings) -> tuple[float, float, float]:
    """(img/s at ``batch``, batch-1 median ms, detections per image)."""
    predictor = _fssd_predictor(model, s)
    x = torch.randn(batch, 3, s.size, s.size, device=s.device)
    sizes = [(s.size, s.size)] * batch
    dets: list = []

    def run(iters: int) -> None:
        for _ in range(iters):
            dets[:] = predictor.predict_batch(x, sizes)

    run(s.warmup)
    rate = _best_rate(lambda: run(s.infer_iters), batch * s.infer_iters, s)
    per_image = sum(len(d["scores"]) for d in dets) / batch
    one = x[:1]
    for _ in range(s.warmup):
        predictor.predict_batch(one, sizes[:1])
    return rate, _median_ms(lambda: predictor.predict_batch(one, sizes[:1]), s), per_image


def infer_torchvision(model: nn.Module, batch: int, s: Settings) -> tuple[float, float, float]:
    model.eval()
    images = [torch.rand(3, s.size, s.size, device=s.device) for _ in range(batch)]
    dets: list = []

    def once(imgs):
        with torch.inference_mode(), s.autocast():
            out = model(imgs)
        return _tv_to_host(out)

    def run(iters: int) -> None:
        for _ in range(iters):
            dets[:] = once(images)

    run(s.warmup)
    rate = _best_rate(lambda: run(s.infer_iters), batch * s.infer_iters, s)
    per_image = sum(len(d["scores"]) for d in dets) / batch
    for _ in range(s.warmup):
        once(images[:1])
    return rate, _median_ms(lambda: once(images[:1]), s), per_image


# ------------------------------------------------------------------------------------------------
# report


class Report:
    def __init__(self, s: Settings, out_dir: Path | None) -> None:
        self.s = s
        self.out_dir = out_dir
        dev = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"CPU ({platform.machine()})"
        cuda = f", CUDA {torch.version.cuda}" if s.device.type == "cuda" else ""
        import torchvision

        self.data: dict[str, Any] = {
            "device": dev,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda if s.device.type == "cuda" else None,
            "python": platform.python_version(),
            "dry_run": s.dry_run,
            "precision": "bf16 autocast" if s.amp_dtype is not None else "fp32",
            "repeats": s.repeats,
            "candidates_per_image": {},
            "detections_per_image": {},
            "rows": [],
            "errors": [],
            "models": {},
        }
        self.header = f"{dev}, torch {torch.__version__}, torchvision {torchvision.__version__}{cuda}"

    def row(self, key: str, measurement: str, batch: int, unit: str, fssd: float | None, tv: float | None,
            higher_is_better: bool = True, note: str = "") -> None:
        speedup = None
        if fssd and tv:
            speedup = fssd / tv if higher_is_better else tv / fssd
        self.data["rows"].append({"key": key, "measurement": measurement, "batch": batch, "unit": unit, "fssd": fssd,
                                  "torchvision": tv, "speedup": speedup, "note": note})
        self.write()

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {exc}".strip()
        self.data["errors"].append(msg)
        print(f"[bench_gpu] ERROR {msg}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        self.write()

    def _target_lines(self) -> list[str]:
        if self.s.dry_run or self.s.device.type != "cuda":
            return ["Targets: not evaluated (dry run on CPU: tiny sizes, not a measurement)."]
        lines = []
        rows = {r["key"]: r for r in self.data["rows"]}
        train = [rows[k]["fssd"] for k in rows if k.startswith("train") and rows[k]["fssd"]]
        infer = rows.get("infer")
        for key, value in (("train", max(train) if train else None), ("infer", infer["fssd"] if infer else None)):
            text, goal = TARGETS[key]
            if value is None:
                verdict = "not measured in this run"
            else:
                verdict = f"{'met' if value >= goal else 'NOT met'} ({value:.0f} img/s)"
            lines.append(f"- {text}: {verdict}")
        self.data["targets"] = lines
        return ["Targets (H100/H200):", ""] + lines

    def markdown(self) -> str:
        d = self.data
        title = "GPU bench (DRY RUN on CPU: tiny sizes, code paths only)" if self.s.dry_run else "GPU bench"
        names = d["models"]
        lines = [
            f"# {title}: FSSD300-VGG16 vs torchvision ssd300_vgg16",
            "",
            f"{self.header}. {d['precision']}, channels_last, cudnn.benchmark; random weights, {NUM_CLASSES} classes, "
            f"{self.s.size}x{self.s.size} inputs; best of {d['repeats']} timed runs after warm-up.",
            "",
        ]
        if d["candidates_per_image"]:
            c = d["candidates_per_image"]
            lines += [f"Background logits shifted to about {CANDIDATES_PER_IMAGE} candidates per image above score "
                      f"{SCORE_THRESHOLD}: fssd {c.get('fssd', 0):.0f}, torchvision {c.get('torchvision', 0):.0f}.", ""]
        lines += [
            f"| measurement | batch | {names.get('fssd', 'fssd')} | {names.get('torchvision', 'torchvision')} "
            f"| fssd speed-up |",
            "|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            f = "-" if r["fssd"] is None else f"{r['fssd']:.1f}"
            t = "-" if r["torchvision"] is None else f"{r['torchvision']:.1f}"
            sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(f"| {r['measurement']} ({r['unit']}){' ' + r['note'] if r['note'] else ''} | {r['batch']} "
                         f"| {f} | {t} | {sp} |")
        if d["detections_per_image"]:
            dpi = d["detections_per_image"]
            lines += ["", f"Detections per image after NMS (batch {self.s.infer_batch}): fssd "
                          f"{dpi.get('fssd', 0):.0f}, torchvision {dpi.get('torchvision', 0):.0f}."]
        lines += [""] + self._target_lines()
        if d["errors"]:
            lines += ["", "Errors:", ""] + [f"- {e}" for e in d["errors"]]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        md = self.markdown()  # also fills data["targets"]
        (self.out_dir / "gpu_bench.md").write_text(md)
        (self.out_dir / "gpu_bench.json").write_text(json.dumps(self.data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one iteration: checks the code paths")
    ap.add_argument("--out-dir", type=Path, default=None, help="write gpu_bench.md and gpu_bench.json here")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the measurements that would start after this many seconds")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (best kept)")
    args = ap.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny sizes: threads only add contention
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        print("bench_gpu.py needs a CUDA GPU (use --dry-run to check the code paths on a CPU)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    s = Settings(args.dry_run, device, args.repeats)
    report = Report(s, args.out_dir)

    def log(msg: str) -> None:
        print(f"[bench_gpu] {time.perf_counter() - start:6.1f}s {msg}", file=sys.stderr, flush=True)

    try:
        fssd_model, tv, fssd_name, tv_name = build_models(s)
        report.data["models"] = {"fssd": fssd_name, "torchvision": tv_name}
        report.data["candidates_per_image"] = calibrate(fssd_model, tv, s)
        log(f"models built and calibrated: {report.data['candidates_per_image']}")
    except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
        report.error("building the models", e)
        print(report.markdown())
        return 1

    def over_budget() -> bool:
        return time.perf_counter() - start > args.budget_s

    for batch in s.train_batches:
        results: dict[str, float | None] = {"fssd": None, "torchvision": None}
        for name, fn, model in (("fssd", train_fssd, fssd_model), ("torchvision", train_torchvision, tv)):
            if over_budget():
                report.data["errors"].append(f"training batch {batch} {name}: skipped (time budget {args.budget_s:.0f} s)")
                continue
            try:
                results[name] = fn(model, batch, s)
                log(f"train batch {batch} {name}: {results[name]:.1f} img/s")
            except Exception as e:  # noqa: BLE001
                report.error(f"training batch {batch} {name}", e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report.row(f"train{batch}", "training", batch, "img/s", results["fssd"], results["torchvision"])

    rates: dict[str, tuple[float, float, float] | None] = {"fssd": None, "torchvision": None}
    for name, fn, model in (("fssd", infer_fssd, fssd_model), ("torchvision", infer_torchvision, tv)):
        if over_budget():
            report.data["errors"].append(f"inference {name}: skipped (time budget {args.budget_s:.0f} s)")
            continue
        try:
            rates[name] = fn(model, s.infer_batch, s)
            log(f"inference {name}: {rates[name][0]:.1f} img/s, batch-1 {rates[name][1]:.2f} ms")
        except Exception as e:  # noqa: BLE001
            report.error(f"inference {name}", e)
    report.data["detections_per_image"] = {k: v[2] for k, v in rates.items() if v is not None}
    report.row("infer", "inference incl. post-processing", s.infer_batch, "img/s",
               rates["fssd"] and rates["fssd"][0], rates["torchvision"] and rates["torchvision"][0])
    report.row("latency", "latency incl. post-processing, median", 1, "ms",
               rates["fssd"] and rates["fssd"][1], rates["torchvision"] and rates["torchvision"][1],
               higher_is_better=False)
    print(report.markdown(), flush=True)
    log("done")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
