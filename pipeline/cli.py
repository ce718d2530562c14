"""The `fssd` console script: one subcommand per pipeline stage, plus detect and import-weights.

Every stage reads params.yaml (``--params``) with dotted ``--set key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

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


def cmd_train(args: argparse.Namespace) -> int:
    from .train import make_job, run_training

    tuned = _tuned_overrides(args)
    params = _params(args, tuned)
    if tuned:
        print(f"[fssd] using tuned values from {args.tuned}: {tuned}", flush=True)
    init = None
    if tuned and args.init_from_tune and Path(args.tuned).is_file():
        init = json.loads(Path(args.tuned).read_text()).get("checkpoint")
    job = make_job(params, init_checkpoint=init if init and Path(init).is_file() else None)
    if args.test_kill_at_epoch is not None:
        job.test_kill_at_epoch = args.test_kill_at_epoch
        job.test_kill_marker = str(Path(args.test_kill_marker).resolve())
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


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a dotted param for this run, e.g. --set train.epochs=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("train", help="train FSSD with Ray Train (DDP over workers and nodes)")
    _add_common(p)
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
    del commands
    return parser


def main(argv: list[str] | None = None) -> int:
    from fssd.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fssd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
