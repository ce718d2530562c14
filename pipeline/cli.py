"""The `fssd` console script: one subcommand per pipeline stage, plus detect and import-weights.

Every stage reads params.yaml (``--params``) with dotted ``--set key=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _params(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from .params import load_params, parse_set

    overrides = {**(extra or {}), **parse_set(args.set or [])}
    return load_params(args.params, overrides)


def _tuned_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """tune/best.json's overrides when train.use_tuned is on (command-line --set still wins)."""
    from .params import parse_set

    base = _params(args)
    best = Path(args.tuned)
    if not base.train.use_tuned or not best.is_file():
        return {}
    data = json.loads(best.read_text())
    cli_keys = set(parse_set(args.set or []))
    return {k: v for k, v in data.get("overrides", {}).items() if k not in cli_keys}


def _timed_metrics(path: Path, started: float, extra: dict[str, Any]) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, {**extra, "seconds": round(time.time() - started, 1)})


def cmd_download(args: argparse.Namespace) -> int:
    from .download import run_download

    started = time.time()
    p = _params(args)
    d = p.data
    summary = run_download(
        dataset=d.dataset, data_root=Path(d.root),
        sources=[dataclasses.asdict(s) for s in d.sources],
        synthetic_images=d.synthetic.num_images, synthetic_seed=d.synthetic.seed,
        synthetic_scenes=d.synthetic.scene_kwargs(),
        s3_endpoint_url=d.s3.endpoint_url, s3_profile=d.s3.profile,
    )
    _timed_metrics(Path(args.metrics_out), started, {"dataset": d.dataset, "files": len(summary["files"]),
                                                     "bytes": summary["bytes"]})
    print(f"[fssd] download: {len(summary['files'])} file(s), {summary['bytes'] / 1e6:.1f} MB in {d.root}/downloads")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_dataset

    started = time.time()
    p = _params(args)
    d = p.data
    kind = d.dataset
    root = Path(d.root)
    if kind == "custom":
        from .convert import convert_custom

        report = convert_custom(d.format, root / "raw", root / "processed", root, d.max_bad_fraction,
                                layout=d.layout, classes=d.classes,
                                val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                val_max_images=d.val_max_images)
        if report.get("classes_found"):
            print(f"[fssd] convert: classes found in the training annotations (data.classes is empty): "
                  f"{', '.join(report['classes_found'])}")
    else:
        report = convert_dataset(kind, root / "raw", root / "processed", root, d.max_bad_fraction,
                                 val_fraction=d.val_fraction, val_max_images=d.val_max_images)
    splits = report["splits"]
    counts = {s: splits[s]["images_written"] for s in splits}
    _timed_metrics(Path(args.metrics_out), started, {"dataset": kind, "classes": len(report["classes"]),
                                                     "images": counts})
    print(f"[fssd] convert: {len(report['classes'])} classes, images per split {counts} -> {root}/processed")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    tuned = _tuned_overrides(args)
    params = _params(args, tuned)
    if tuned:
        print(f"[fssd] using tuned values from {args.tuned}: {tuned}", flush=True)
    init = None
    if tuned and args.init_from_tune and Path(args.tuned).is_file():
        init = json.loads(Path(args.tuned).read_text()).get("checkpoint")
    # Ray workers run elsewhere: the checkpoint path must be absolute.
    init_path = str(Path(init).resolve()) if init and Path(init).is_file() else None
    from .job import make_job  # no torch: a job that cannot run is refused before torch and Ray load

    job = make_job(params, init_checkpoint=init_path)
    if args.test_kill_at_epoch is not None:
        job.test_kill_at_epoch = args.test_kill_at_epoch
        job.test_kill_marker = str(Path(args.test_kill_marker).resolve())
    from .train import run_training

    metrics = run_training(params, model_out=Path(args.model_out), metrics_out=Path(args.metrics_out), job=job)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    import torch

    from fssd.checkpoint import save_checkpoint
    from fssd.models.presets import build_detector, preset_config
    from fssd.weights import from_pytorchssd, load_state_dict_file, vgg16_backbone_from_torchvision

    state = load_state_dict_file(args.source)
    if args.kind == "vgg16":
        out = vgg16_backbone_from_torchvision(state)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, args.output)
        print(f"wrote the reduced-fc VGG16 backbone ({len(out)} tensors) to {args.output}")
        return 0
    cfg = preset_config(args.preset, args.num_classes)
    model = build_detector(cfg)
    model.load_state_dict(from_pytorchssd(state))
    names = args.class_names.split(",") if args.class_names else [f"class{i}" for i in range(1, args.num_classes)]
    save_checkpoint(args.output, model, cfg, names, meta={"imported_from": str(args.source)})
    print(f"wrote an FSSD checkpoint ({args.preset}, {args.num_classes} classes) to {args.output}")
    return 0


def add_common(p: argparse.ArgumentParser) -> None:
    from .params import add_params_args

    add_params_args(p)


# Stage modules that add their own subcommands (add_cli(subparsers)).
_STAGE_MODULES = ("tune", "evaluate", "register", "detect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch (or generate) the dataset into data/downloads and extract it to data/raw")
    add_common(p)
    p.add_argument("--metrics-out", default="metrics/download.json")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="convert data/raw into COCO-format split files in data/processed")
    add_common(p)
    p.add_argument("--metrics-out", default="metrics/convert.json")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train FSSD with Ray Train (DDP over workers and nodes)")
    add_common(p)
    p.add_argument("--tuned", default="tune/best.json", help="tuned overrides applied when train.use_tuned")
    p.add_argument("--no-init-from-tune", dest="init_from_tune", action="store_false",
                   help="start from scratch instead of the best trial's checkpoint")
    p.add_argument("--model-out", default="models/fssd.pt")
    p.add_argument("--metrics-out", default="metrics/train.json")
    p.add_argument("--test-kill-at-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--test-kill-marker", default="ray_results/.killed", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import-weights", help="convert third-party weights (authors' FSSD, torchvision VGG16)")
    p.add_argument("kind", choices=["pytorchssd", "vgg16"],
                   help="pytorchssd: an authors' FSSD_vgg .pth -> an FSSD checkpoint; vgg16: torchvision ImageNet "
                        "VGG16 -> our reduced-fc backbone state dict")
    p.add_argument("source", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--preset", default="fssd300_vgg16")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--class-names", default=None, help="comma-separated object classes (no background)")
    p.set_defaults(func=cmd_import_weights)
    for module in _STAGE_MODULES:
        try:
            mod = importlib.import_module(f"pipeline.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"pipeline.{module}":
                raise
            continue
        mod.add_cli(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors the stages raise on purpose: :class:`pipeline.errors.UserError` (download,
    archive, conversion, job, init, search, detect), ``fssd.config.ConfigError`` (params, search
    space) and the library's checkpoint and weights errors. Those two modules load torch, so their
    classes are looked up only when they were imported: an error of a module that was never
    imported cannot have been raised."""
    from fssd.config import ConfigError

    from .errors import UserError

    found: list[type[BaseException]] = [UserError, ConfigError]
    for module, name in (("fssd.checkpoint", "CheckpointError"), ("fssd.weights", "WeightsError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. An error raised on purpose (:func:`_user_errors`) ends in one line,
    ``fssd <command>: error: <message>``, and exit status 2; anything else is a bug and keeps its
    traceback (exit status 1). ``FSSD_DEBUG=1`` shows the traceback of both."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _user_errors()) or os.environ.get("FSSD_DEBUG", "") not in ("", "0"):
            raise
        print(f"fssd {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
