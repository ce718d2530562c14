"""`fssd detect`: run a trained FSSD on image files; JSON detections with class names and the
dataset's own category ids.

``fssd detect IMAGES... --model PATH | models:/NAME@ALIAS | models:/NAME/VERSION``

* ``--model`` is an FSSD checkpoint (``models/fssd.pt``, the default), a saved MLflow pyfunc model
  directory, or a registry URI (``models:/fssd-synthetic@champion``); for an MLflow model the
  checkpoint artifact is downloaded and run with :class:`fssd.predictor.Predictor` directly.
* Detections go to stdout, or to ``--output FILE.json`` (written atomically)::

      {"model": "...", "score_threshold": 0.3, "images": [
        {"image": "a.jpg", "width": 640, "height": 480,
         "detections": [{"label": 1, "name": "circle", "score": 0.97, "box": [x1, y1, x2, y2]}, ...]},
        {"image": "broken.jpg", "error": "image broken.jpg cannot be decoded (...)"}]}

  Boxes are (x1, y1, x2, y2) in the image's pixels.
* ``--draw OUT_DIR`` writes a copy of each image with its detections drawn.
* An unreadable image is reported on stderr and as an ``error`` entry; the others are still
  processed. Exit code 0 when every image was processed, 1 when some failed, 2 when the model
  cannot be loaded (the message names the path or URI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

from .errors import UserError

__all__ = ["ModelLoadError", "load_predictor", "detect_files", "add_cli", "main"]

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelLoadError(UserError, ValueError):
    """The model path or URI cannot be loaded; the message names it and says what to pass."""


def _redact(uri: str) -> str:
    """A URI without user:password (never print credentials)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def _checkpoint_in_model_dir(model_dir: Path, what: str) -> Path:
    """The checkpoint artifact of a saved FSSD pyfunc model directory (read from its MLmodel)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    try:
        conf = yaml.safe_load(mlmodel.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelLoadError(f"{what} is not a readable MLflow model ({mlmodel}: {e})") from None
    arts = ((conf.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    entry = arts.get("checkpoint")
    rel = entry.get("path") if isinstance(entry, dict) else None
    if not rel or not (model_dir / rel).is_file():
        raise ModelLoadError(
            f"{what} is an MLflow model without an FSSD 'checkpoint' artifact; pass a model logged by "
            "`fssd register` or an FSSD checkpoint file"
        )
    return model_dir / rel


def load_predictor(
    model: str,
    *,
    tracking_uri: str | None = None,
    device: str | None = None,
    **overrides: Any,
):
    """A :class:`~fssd.predictor.Predictor` for a checkpoint file, an MLflow model directory or an
    MLflow URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``).

    Raises :class:`ModelLoadError` naming ``model`` when it cannot be loaded.
    """
    def build(path: Path):
        from fssd.checkpoint import CheckpointError  # torch loads here, once a model file was found
        from fssd.predictor import Predictor

        try:
            return Predictor.from_checkpoint(path, device=device, **overrides)
        except CheckpointError as e:
            raise ModelLoadError(f"cannot load model {model!r}: {e}") from None

    if model.startswith(MLFLOW_SCHEMES):
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        from .tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri or "sqlite:///mlflow.db")
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            # MLflow would create an empty store there; say where we looked instead
            raise ModelLoadError(
                f"cannot load model {model!r}: there is no MLflow store at {uri[len('sqlite:///'):]}; run from the "
                "project root (where mlflow.db is) or set MLFLOW_TRACKING_URI / mlflow.tracking_uri"
            )
        tmp = Path(tempfile.mkdtemp(prefix="fssd-detect-"))
        try:
            try:
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=model, dst_path=str(tmp), tracking_uri=uri, registry_uri=uri))
            except MlflowException as e:
                raise ModelLoadError(
                    f"cannot load model {model!r} from the MLflow registry at {_redact(uri)}: {e.message}. "
                    "Check the model name and alias/version (the MLflow UI lists them) or set MLFLOW_TRACKING_URI"
                ) from None
            except OSError as e:
                raise ModelLoadError(f"cannot download model {model!r} from {_redact(uri)}: {e}") from None
            if not (local / "MLmodel").is_file():
                raise ModelLoadError(f"{model!r} does not point at an MLflow model (no MLmodel file in it)")
            return build(_checkpoint_in_model_dir(local, repr(model)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    path = Path(model)
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return build(_checkpoint_in_model_dir(path, f"model directory {path}"))
        raise ModelLoadError(f"model {path} is a directory without an MLmodel file; pass a checkpoint file "
                             "(models/fssd.pt) or an MLflow model directory / models:/NAME@ALIAS URI")
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist; pass a checkpoint (e.g. models/fssd.pt, written by "
                             "`dvc repro train`) or a registry URI such as models:/fssd-synthetic@champion")
    return build(path)


def _entry(path: str, image: Any, det: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": path,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "detections": [
            {"label": int(k), "category_id": int(c), "name": str(n), "score": round(float(s), 5),
             "box": [round(float(v), 2) for v in b]}
            for b, s, k, c, n in zip(det["boxes"], det["scores"], det["labels"], det["category_ids"], det["names"])
        ],
    }


def _draw_name(path: Path, used: set[str]) -> str:
    suffix = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp") else ".jpg"
    stem = re.sub(r"[^0-9A-Za-z_.-]", "_", path.stem) or "image"
    name, i = f"{stem}{suffix}", 1
    while name in used:
        name, i = f"{stem}_{i}{suffix}", i + 1
    used.add(name)
    return name


def detect_files(
    predictor: Any,
    paths: Sequence[str | os.PathLike],
    *,
    draw_dir: Path | None = None,
    batch_size: int = 8,
    draw_threshold: float | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Detections for image files, in order; returns (entries, number of failed images).

    Images are read and predicted ``batch_size`` at a time (so memory stays bounded); an image that
    cannot be read gets an ``error`` entry and is reported on stderr.
    """
    from fssd.predictor import draw_detections, read_image, write_image

    entries: list[dict[str, Any]] = []
    failed = 0
    used: set[str] = set()
    threshold = predictor.score_threshold if draw_threshold is None else draw_threshold
    paths = [str(p) for p in paths]
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images: list[Any] = []
        for p in chunk:
            try:
                images.append(read_image(p))
            except (ValueError, OSError) as e:
                images.append(e)
        ok = [im for im in images if not isinstance(im, Exception)]
        dets = iter(predictor.predict(ok, batch_size=batch_size) if ok else [])
        for p, im in zip(chunk, images):
            if isinstance(im, Exception):
                failed += 1
                print(f"fssd detect: error: {im}", file=sys.stderr, flush=True)
                entries.append({"image": p, "error": str(im)})
                continue
            det = next(dets)
            entries.append(_entry(p, im, det))
            if draw_dir is not None:
                write_image(Path(draw_dir) / _draw_name(Path(p), used),
                            draw_detections(im, det, score_threshold=threshold))
    return entries, failed


def _tracking_uri(args: argparse.Namespace) -> str | None:
    """MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri (when a params file is at hand)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from .params import load_params, parse_set

    path = Path(args.params) if args.params else Path("params.yaml")
    if args.params is None and not path.is_file():
        return None
    return load_params(path, parse_set(args.set or [])).mlflow.tracking_uri


def _cmd_detect(args: argparse.Namespace) -> int:
    from fssd.config import ConfigError

    if not 0.0 <= args.score_threshold < 1.0:
        print(f"fssd detect: error: --score-threshold must be in [0, 1), got {args.score_threshold}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"fssd detect: error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        uri = _tracking_uri(args) if args.model.startswith(MLFLOW_SCHEMES) else None
        predictor = load_predictor(args.model, tracking_uri=uri, device=args.device,
                                   score_threshold=args.score_threshold, batch_size=args.batch_size)
    except (ModelLoadError, ConfigError) as e:
        print(f"fssd detect: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # e.g. --device cuda on a machine without CUDA
        print(f"fssd detect: error: cannot load model {args.model!r} on device {args.device or 'default'}: {e}",
              file=sys.stderr, flush=True)
        return 2
    entries, failed = detect_files(predictor, args.images, draw_dir=Path(args.draw) if args.draw else None,
                                   batch_size=args.batch_size)
    doc = {"model": args.model, "score_threshold": args.score_threshold, "images": entries}
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, out)
        n = sum(len(e.get("detections", [])) for e in entries)
        print(f"[fssd] {n} detections in {len(entries) - failed}/{len(entries)} images -> {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if failed:
        print(f"fssd detect: {failed} of {len(entries)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def add_cli(subparsers: Any) -> None:
    """Add ``fssd detect`` to the ``fssd`` console script's subparsers."""
    p = subparsers.add_parser(
        "detect", help="detect objects in image files with a checkpoint or a registered model",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default="models/fssd.pt",
                   help="checkpoint file, MLflow model directory, or models:/NAME@ALIAS (default: models/fssd.pt)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections above this score (default 0.3)")
    p.add_argument("--draw", metavar="OUT_DIR", default=None, help="write annotated copies of the images here")
    p.add_argument("--output", metavar="FILE.json", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--params", default=None,
                   help="params file for mlflow.tracking_uri (default: params.yaml when present; "
                        "MLFLOW_TRACKING_URI wins)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted param (repeatable)")
    p.set_defaults(func=_cmd_detect)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.detect IMAGES...`` (the same as ``fssd detect``)."""
    parser = argparse.ArgumentParser(prog="fssd")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["detect", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
