"""The `evaluate` stage: test-set metrics, per-class table, PR curves, speed, drawn detections.

Reads ``models/fssd.pt`` and ``data/processed/test.json``; writes (atomically)

* ``metrics/eval.json``          DVC metrics: VOC07 / VOC2010+ mAP, COCO AP, per-class AP, speed,
                                  device, test image count, stage seconds, the MLflow run id;
* ``metrics/eval_per_class.md``  a Markdown table of per-class AP;
* ``plots/pr_curves.csv``        DVC plot data, columns ``class,recall,precision`` (each class's
                                  curve downsampled to at most 200 points);
* ``plots/pr_curves.png``        all classes' PR curves on one axis;
* ``plots/detections/*.jpg``     the first ``evaluate.num_draw`` test images with their
                                  detections scoring >= 0.3;

then logs the metrics (``test_`` prefix) and those files (under ``evaluation/``) to the training
run's MLflow run (``mlflow_run_id`` in ``metrics/train.json``), or to a new run tagged
``fssd.stage=evaluate`` when there is none.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # torch, numpy and the params module load on use: `fssd --help` stays fast
    import numpy as np
    import torch

    from .params import Params

__all__ = [
    "run_evaluate",
    "add_cli",
    "device_name",
    "measure_speed",
    "pr_curve_rows",
    "mlflow_metrics",
    "DRAW_SCORE_THRESHOLD",
]

DRAW_SCORE_THRESHOLD = 0.3
MAX_PR_POINTS = 200


# --------------------------------------------------------------------------------------------
# small helpers


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (``/proc/cpuinfo``, else ``platform``) with its core count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({os.cpu_count() or 1} CPUs, {torch.get_num_threads()} torch threads)"


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    predictor: Any,
    images: Sequence[np.ndarray],
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    min_seconds: float = 2.0,
    min_iters: int = 3,
    max_iters: int = 200,
) -> dict[str, Any]:
    """Latency at batch 1 and the best throughput over ``batch_sizes``, through ``predictor.predict``.

    What is timed: preprocessing (resize + normalise), the forward pass and post-processing of
    images already decoded in memory (file reading and JPEG decoding excluded). Each batch size
    gets one warm-up call, then at least ``min_iters`` timed calls and at least ``min_seconds``.
    Batches are filled by repeating ``images`` when there are fewer of them.
    """
    import numpy as np

    if not images:
        raise ValueError("measure_speed needs at least one image")
    sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
    if not sizes:
        raise ValueError(f"speed batch sizes must include a positive integer, got {tuple(batch_sizes)!r}")
    device = predictor.device
    by_bs: dict[str, float] = {}
    latency_ms = None
    for bs in sizes:
        batch = [images[i % len(images)] for i in range(bs)]
        predictor.predict(batch, batch_size=bs)  # warm-up (cudnn autotune, allocator, caches)
        _sync(device)
        times = []
        start = time.perf_counter()
        while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_seconds):
            t = time.perf_counter()
            predictor.predict(batch, batch_size=bs)
            _sync(device)
            times.append(time.perf_counter() - t)
        by_bs[str(bs)] = bs * len(times) / sum(times)
        if bs == 1:
            latency_ms = float(np.median(times) * 1000.0)
    best = max(by_bs, key=lambda k: by_bs[k])
    return {
        "batch1_latency_ms": round(latency_ms, 3) if latency_ms is not None else None,
        "throughput_img_s": round(by_bs[best], 3),
        "best_batch_size": int(best),
        "throughput_by_batch_size": {k: round(v, 3) for k, v in by_bs.items()},
        "timed": "preprocess + forward + postprocess of decoded images",
    }


def pr_curve_rows(voc: Any, max_points: int = MAX_PR_POINTS) -> list[tuple[str, float, float]]:
    """``(class, recall, precision)`` rows of every class with detections, each curve cut to at
    most ``max_points`` points (evenly spaced along the detections, first and last kept)."""
    import numpy as np

    rows: list[tuple[str, float, float]] = []
    for cat, name in voc.category_names.items():
        rec, prec = np.asarray(voc.recall[cat]), np.asarray(voc.precision[cat])
        if rec.size == 0:
            continue
        idx = np.unique(np.linspace(0, rec.size - 1, min(rec.size, max_points)).round().astype(np.int64))
        rows.extend((name, round(float(rec[i]), 6), round(float(prec[i]), 6)) for i in idx)
    return rows


def _metric_key(name: str) -> str:
    """An MLflow-safe metric name fragment (alphanumerics, _ - . / and spaces are allowed)."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of ``eval.json`` as flat ``test_``-prefixed MLflow metrics."""
    out: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"test_{_metric_key(key)}"] = float(v)

    put("map_voc07", metrics.get("map_voc07"))
    put("map_area", metrics.get("map_area"))
    for k, v in (metrics.get("coco") or {}).items():
        put(f"coco_{k}", v)
    for name, v in (metrics.get("per_class_ap") or {}).items():
        put(f"ap_{name}", v)
    speed = metrics.get("speed") or {}
    put("latency_ms_batch1", speed.get("batch1_latency_ms"))
    put("throughput_img_s", speed.get("throughput_img_s"))
    put("throughput_best_batch_size", speed.get("best_batch_size"))
    put("num_images", metrics.get("num_test_images"))
    put("num_detections", metrics.get("num_detections"))
    put("eval_seconds", metrics.get("seconds"))
    return out


# --------------------------------------------------------------------------------------------
# outputs


def _per_class_markdown(voc07: Any, area: Any, summary: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{100.0 * v:.2f}"

    lines = [
        "# Per-class AP on the test split",
        "",
        f"mAP (VOC2007 11-point) **{fmt(summary.get('map_voc07'))}**, "
        f"mAP (VOC2010+ area) **{fmt(summary.get('map_area'))}**, "
        f"COCO AP **{fmt((summary.get('coco') or {}).get('AP'))}** "
        f"on {summary.get('num_test_images')} images (AP in %, IoU > 0.5 for VOC).",
        "",
        "| class | AP VOC07 | AP area | objects | detections |",
        "|:------|---------:|--------:|--------:|-----------:|",
    ]
    for cat, name in voc07.category_names.items():
        safe = str(name).replace("|", "\\|")
        lines.append(
            f"| {safe} | {fmt(voc07.ap[cat])} | {fmt(area.ap[cat])} | {voc07.num_gt[cat]} | {voc07.num_detections[cat]} |"
        )
    if voc07.no_ground_truth:
        names = ", ".join(voc07.category_names[c] for c in voc07.no_ground_truth)
        lines += ["", f"Classes without (non-difficult) test objects, left out of the mean: {names}."]
    return "\n".join(lines) + "\n"


def _write_pr_csv(path: Path, rows: list[tuple[str, float, float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "recall", "precision"])
    w.writerows(rows)
    _atomic_write_text(path, buf.getvalue())


def _write_pr_png(path: Path, voc07: Any) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for cat, name in voc07.category_names.items():
        rec, prec = np.asarray(voc07.recall[cat]), np.asarray(voc07.precision[cat])
        if rec.size == 0:
            continue
        ap = voc07.ap[cat]
        label = f"{name} (AP {100 * ap:.1f})" if ap is not None else str(name)
        ax.plot(rec, prec, linewidth=1.2, label=label)
        plotted += 1
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    m = voc07.map
    ax.set_title(f"PR curves, test split (mAP VOC07 {100 * m:.1f})" if m is not None else "PR curves, test split")
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(loc="lower left", fontsize="small" if plotted <= 10 else "x-small", ncol=1 if plotted <= 12 else 2)
    else:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write_bytes(path, buf.getvalue())


def _draw_examples(
    out_dir: Path,
    dataset: Any,
    detections: list[dict[str, Any]],
    category_ids: list[int],
    class_names: list[str],
    num_draw: int,
) -> list[Path]:
    """Draw the first ``num_draw`` test images with their detections into ``out_dir`` (replaced)."""
    import numpy as np

    from fssd.predictor import draw_detections, write_image

    label_of = {c: i + 1 for i, c in enumerate(category_ids)}
    per_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        per_image.setdefault(d["image_id"], []).append(d)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = []
    try:
        for index in range(min(num_draw, len(dataset))):
            image = dataset.load_image(index)
            dets = per_image.get(dataset.ids[index], [])
            xywh = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
            labels = np.array([label_of[d["category_id"]] for d in dets], dtype=np.int64)
            det = {
                "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                "scores": np.array([d["score"] for d in dets], dtype=np.float64),
                "labels": labels,
                "names": [class_names[k - 1] for k in labels],
            }
            stem = re.sub(r"[^0-9A-Za-z_.-]", "_", Path(str(dataset.image_path(index))).stem)
            name = f"{index:03d}_{stem}.jpg"
            write_image(tmp / name, draw_detections(image, det, score_threshold=DRAW_SCORE_THRESHOLD))
            names.append(name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / n for n in names]


# --------------------------------------------------------------------------------------------
# MLflow


def _read_run_id(train_metrics: Path | None) -> str | None:
    if train_metrics is None or not Path(train_metrics).is_file():
        return None
    try:
        data = json.loads(Path(train_metrics).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    run_id = data.get("mlflow_run_id") if isinstance(data, dict) else None
    return str(run_id) if run_id else None


def resolve_run(tracking_uri: str, experiment: str, run_id: str | None, *, stage: str,
                processed_dir: Path | None = None) -> tuple[str, bool]:
    """(run_id, created): the given run when it exists in this store, else a new run tagged
    ``fssd.stage=<stage>`` in ``experiment``."""
    from mlflow.exceptions import MlflowException

    from . import tracking

    c = tracking.client(tracking_uri)
    if run_id:
        try:
            c.get_run(run_id)
            return run_id, False
        except MlflowException:
            print(f"[fssd] MLflow run {run_id} (from the train stage) is not in {tracking_uri}; "
                  f"logging to a new run tagged fssd.stage={stage}", file=sys.stderr, flush=True)
    tags = {"fssd.stage": stage}
    if processed_dir is not None:
        tags.update(tracking.provenance_tags(processed_dir))
    exp_id = tracking.experiment_id(tracking_uri, experiment)
    run = c.create_run(exp_id, run_name=stage, tags=tags)
    return run.info.run_id, True


def _log_to_mlflow(tracking_uri: str, run_id: str, created: bool, metrics: Mapping[str, Any],
                   files: list[Path], detections_dir: Path | None) -> None:
    from mlflow.entities import Metric

    from . import tracking

    c = tracking.client(tracking_uri)
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, 0) for k, v in mlflow_metrics(metrics).items()]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])
    c.set_tag(run_id, "fssd.evaluated", "true")
    for f in files:
        c.log_artifact(run_id, str(f), artifact_path="evaluation")
    if detections_dir is not None and detections_dir.is_dir() and any(detections_dir.iterdir()):
        c.log_artifacts(run_id, str(detections_dir), artifact_path="evaluation/detections")
    if created:
        c.set_terminated(run_id, status="FINISHED")


# --------------------------------------------------------------------------------------------
# the stage


def run_evaluate(
    params: Params,
    *,
    checkpoint: Path = Path("models/fssd.pt"),
    out_metrics: Path = Path("metrics/eval.json"),
    plots_dir: Path = Path("plots"),
    per_class_md: Path | None = None,
    test_json: Path | None = None,
    data_root: Path | None = None,
    train_metrics: Path | None = Path("metrics/train.json"),
    log_mlflow: bool = True,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    speed_batch_sizes: Sequence[int] = (1, 8, 32),
    speed_min_seconds: float = 2.0,
) -> dict[str, Any]:
    """The `evaluate` stage (see the module docstring). Returns what it wrote to ``out_metrics``.

    Args:
        checkpoint: the FSSD checkpoint to evaluate.
        out_metrics: the metrics JSON; the per-class table goes beside it
            (``eval_per_class.md``) unless ``per_class_md`` is given.
        plots_dir: receives ``pr_curves.csv``, ``pr_curves.png`` and ``detections/``.
        test_json, data_root: the test split and its image root (default
            ``<data.root>/processed/test.json`` and ``data.root``).
        train_metrics: the train stage's metrics JSON holding ``mlflow_run_id``.
        log_mlflow: log to MLflow (tracking URI from ``mlflow.tracking_uri`` or
            ``MLFLOW_TRACKING_URI``).
        device: default CUDA when available, else CPU.
        num_workers: DataLoader processes (default ``train.loader_workers``).
        speed_batch_sizes, speed_min_seconds: the speed measurement (:func:`measure_speed`).
    """
    from .errors import MissingFileError

    # the inputs that earlier stages write, checked before torch loads
    if not Path(checkpoint).is_file():
        raise MissingFileError(f"checkpoint {checkpoint} does not exist; run the train stage first "
                               "(dvc repro train) or pass --checkpoint PATH")
    import torch
    from torch.utils.data import DataLoader

    from fssd.checkpoint import load_model
    from fssd.data.collate import detection_collate
    from fssd.data.dataset import DetectionDataset
    from fssd.data.transforms import eval_transform
    from fssd.engine import predict
    from fssd.evaluation import coco_metrics, voc_map
    from fssd.predictor import Predictor

    from . import tracking

    started = time.time()
    ev = params.evaluate
    data_root = Path(data_root) if data_root is not None else Path(params.data.root)
    test_json = Path(test_json) if test_json is not None else data_root / "processed" / "test.json"
    out_metrics = Path(out_metrics)
    plots_dir = Path(plots_dir)
    per_class_md = Path(per_class_md) if per_class_md is not None else out_metrics.with_name("eval_per_class.md")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"

    model, payload = load_model(checkpoint, map_location=dev)
    class_names: list[str] = list(payload["class_names"])
    cfg = model.config
    dataset = DetectionDataset(test_json, data_root, eval_transform(cfg.input_size, cfg.image_mean, cfg.image_std),
                               ignored="target")
    if dataset.class_names != class_names:
        raise ValueError(
            f"checkpoint {checkpoint} was trained on classes {class_names} but {test_json} has "
            f"{dataset.class_names}; evaluate on the dataset it was trained on, or retrain"
        )
    if len(dataset) == 0:
        raise ValueError(f"{test_json} has no images; re-run the convert stage with a dataset that has a test split")
    category_ids = [c for c in range(1, len(class_names) + 1)]
    workers = params.train.loader_workers if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=ev.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=detection_collate, pin_memory=cuda)
    # CUDA only: the training run's autocast dtype and memory format
    amp_dtype = getattr(torch, params.train.amp_dtype) if (params.train.amp and cuda) else None
    channels_last = bool(params.train.channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    detections = predict(
        model, loader, device=dev, score_threshold=ev.score_threshold, nms_threshold=ev.nms_threshold,
        top_k_per_class=ev.top_k_per_class, max_detections=ev.max_detections, amp_dtype=amp_dtype,
        channels_last=channels_last, category_ids=category_ids,
    )
    voc07 = voc_map(test_json, detections, iou_threshold=0.5, use_07_metric=True)
    area = voc_map(test_json, detections, iou_threshold=0.5, use_07_metric=False)
    coco_all = coco_metrics(test_json, detections)
    coco = {k: coco_all[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}

    predictor = Predictor(
        model, class_names, device=dev, score_threshold=ev.score_threshold, nms_threshold=ev.nms_threshold,
        top_k_per_class=ev.top_k_per_class, max_detections=ev.max_detections,
        amp=amp_dtype is not None, amp_dtype=amp_dtype or torch.bfloat16, channels_last=channels_last,
    )
    n_speed = min(len(dataset), max(int(b) for b in speed_batch_sizes))
    speed_images = [dataset.load_image(i) for i in range(n_speed)]
    speed = measure_speed(predictor, speed_images, speed_batch_sizes, min_seconds=speed_min_seconds)

    metrics: dict[str, Any] = {
        "map_voc07": voc07.map,
        "map_area": area.map,
        "coco": coco,
        "per_class_ap": voc07.ap_by_name,
        "per_class_ap_area": area.ap_by_name,
        "num_test_images": len(dataset),
        "num_detections": len(detections),
        "speed": speed,
        "device": device_name(dev),
        "checkpoint": str(checkpoint),
    }

    run_id, created = None, False
    uri = None
    if log_mlflow:
        uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri)
        run_id, created = resolve_run(uri, params.mlflow.experiment, _read_run_id(train_metrics), stage="evaluate",
                                      processed_dir=test_json.parent)
    metrics["mlflow_run_id"] = run_id

    pr_csv, pr_png = plots_dir / "pr_curves.csv", plots_dir / "pr_curves.png"
    _write_pr_csv(pr_csv, pr_curve_rows(voc07))
    _write_pr_png(pr_png, voc07)
    det_dir = plots_dir / "detections"
    _draw_examples(det_dir, dataset, detections, category_ids, class_names, ev.num_draw)
    metrics["seconds"] = round(time.time() - started, 2)
    _atomic_write_text(per_class_md, _per_class_markdown(voc07, area, metrics))
    metrics = _json_value(metrics)
    _atomic_write_text(out_metrics, json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    if log_mlflow and uri is not None and run_id is not None:
        _log_to_mlflow(uri, run_id, created, metrics, [out_metrics, per_class_md, pr_csv, pr_png], det_dir)
    return metrics


# --------------------------------------------------------------------------------------------
# CLI


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .params import load_params, parse_set

    try:
        params = load_params(args.params, parse_set(args.set or []))
        metrics = run_evaluate(
            params,
            checkpoint=Path(args.checkpoint),
            out_metrics=Path(args.metrics_out),
            plots_dir=Path(args.plots_dir),
            train_metrics=Path(args.train_metrics),
            log_mlflow=not args.no_mlflow,
            device=args.device,
            speed_batch_sizes=args.speed_batch_sizes,
            speed_min_seconds=args.speed_seconds,
        )
    except (ValueError, FileNotFoundError) as e:  # bad params, checkpoint or split: the message names it
        print(f"fssd evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    s = metrics["speed"]
    print(
        f"[fssd] test mAP VOC07 {pct(metrics['map_voc07'])}, area {pct(metrics['map_area'])}, "
        f"COCO AP {pct(metrics['coco']['AP'])} on {metrics['num_test_images']} images; "
        f"batch-1 latency {s['batch1_latency_ms']} ms, {s['throughput_img_s']} img/s at batch {s['best_batch_size']} "
        f"on {metrics['device']}; wrote {args.metrics_out}",
        flush=True,
    )
    return 0


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 1,8,32; got {text!r}")
    return sizes


def add_cli(subparsers: Any) -> None:
    """Add ``fssd evaluate`` to the ``fssd`` console script's subparsers."""
    from .params import add_params_args

    p = subparsers.add_parser("evaluate", help="test-set mAP (VOC07, area, COCO), PR curves, speed; logged to MLflow")
    add_params_args(p, "evaluate.batch_size=8")
    p.add_argument("--checkpoint", default="models/fssd.pt", help="checkpoint to evaluate (default: models/fssd.pt)")
    p.add_argument("--metrics-out", default="metrics/eval.json")
    p.add_argument("--plots-dir", default="plots")
    p.add_argument("--train-metrics", default="metrics/train.json",
                   help="the train stage's metrics (its mlflow_run_id is the run logged to)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--speed-batch-sizes", type=_batch_sizes, default=(1, 8, 32), metavar="N,N,...",
                   help="batch sizes of the speed measurement (default: 1,8,32)")
    p.add_argument("--speed-seconds", type=float, default=2.0,
                   help="minimum seconds timed per batch size (default: 2)")
    p.set_defaults(func=_cmd_evaluate)
