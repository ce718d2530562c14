"""The `register` stage: log the model as an MLflow pyfunc, register it, move the champion alias.

* The model is logged with :func:`mlflow.pyfunc.log_model` under the training run (its id is in
  ``metrics/eval.json`` / ``metrics/train.json``) as ``model``: an :class:`FSSDPyfuncModel` whose
  artifact ``checkpoint`` is a slim copy of ``models/fssd.pt`` (weights, config, class names; no
  optimizer state), with the ``fssd`` and ``pipeline`` packages as ``code_paths`` (the model loads
  where they are not installed) and explicit pinned ``pip_requirements`` (no inference, no network).
* It is registered as a new version of ``register.model_name``, tagged with its test metrics
  (``test_map_voc07`` ...), the data hash and the git commit.
* The alias ``register.alias`` (``champion``) moves to the new version only when its test
  ``map_voc07`` is strictly higher than the current champion's (read from that version's
  ``test_map_voc07`` tag); a tie keeps the old champion. A champion without that tag (set by
  hand) is left alone.
* ``metrics/register.json`` says what happened.

The pyfunc model
----------------
Input: a DataFrame with one column ``image``: encoded image files (JPEG, PNG, ... as ``bytes``;
base64 strings are accepted too, as JSON serving sends them) or RGB ``uint8`` arrays [H, W, 3].
Called directly (``model.unwrap_python_model().predict(None, images)``) it also takes a list of
such images. Optional param ``score_threshold``.
Output: a DataFrame with one row per detection: ``image_index`` (row of the input), ``label``
(1..K), ``name``, ``score``, ``x1``, ``y1``, ``x2``, ``y2`` (pixels of that image).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.io import atomic_write_json

__all__ = [
    "FSSDPyfuncModel",
    "OUTPUT_COLUMNS",
    "run_register",
    "decide_alias",
    "pip_requirements",
    "model_signature",
    "add_cli",
]

OUTPUT_COLUMNS = ("image_index", "label", "name", "score", "x1", "y1", "x2", "y2")
CHECKPOINT_ARTIFACT = "checkpoint"
MAP_TAG = "test_map_voc07"
_REPO_PACKAGES = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# the pyfunc model (defined on first use, so that `import pipeline.register` and with it the
# `fssd` CLI do not pay for importing mlflow)


def _to_image(value: Any, index: int):
    import numpy as np

    from fssd.predictor import decode_image

    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image {index}: a string must be a base64-encoded image file") from None
    else:
        raise ValueError(
            f"image {index}: expected encoded image bytes (JPEG/PNG), a base64 string or an RGB uint8 "
            f"array, got {type(value).__name__}"
        )
    try:
        return decode_image(data)
    except ValueError as e:
        raise ValueError(f"image {index}: {e}") from None


def _images_from_input(model_input: Any) -> list:
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"the input DataFrame needs a column 'image'; it has {list(model_input.columns)}")
        values = list(model_input["image"])
    elif isinstance(model_input, Mapping):
        if "image" not in model_input:
            raise ValueError(f"the input needs a key 'image'; it has {sorted(model_input)}")
        v = model_input["image"]
        values = list(v) if isinstance(v, (list, tuple, pd.Series)) else [v]
    elif isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim == 3:
        values = [model_input]
    elif isinstance(model_input, (list, tuple, pd.Series)) or (
        isinstance(model_input, np.ndarray) and model_input.dtype == object
    ):
        values = list(model_input)
    else:
        raise ValueError(f"unsupported model input of type {type(model_input).__name__}; pass a DataFrame "
                         "with an 'image' column of encoded image bytes")
    return [_to_image(v, i) for i, v in enumerate(values)]


def detections_frame(detections: list[dict[str, Any]]):
    """Predictor detections -> the pyfunc output DataFrame (:data:`OUTPUT_COLUMNS`)."""
    import numpy as np
    import pandas as pd

    cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
    for i, det in enumerate(detections):
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        n = len(boxes)
        cols["image_index"].extend([i] * n)
        cols["label"].extend(int(v) for v in det["labels"])
        cols["name"].extend(str(v) for v in det["names"])
        cols["score"].extend(float(v) for v in det["scores"])
        for j, c in enumerate(("x1", "y1", "x2", "y2")):
            cols[c].extend(boxes[:, j].tolist())
    return pd.DataFrame({
        "image_index": np.asarray(cols["image_index"], dtype=np.int64),
        "label": np.asarray(cols["label"], dtype=np.int64),
        "name": pd.Series(cols["name"], dtype=object),
        **{c: np.asarray(cols[c], dtype=np.float64) for c in ("score", "x1", "y1", "x2", "y2")},
    })


def _define_pyfunc_model() -> type:
    import mlflow.pyfunc
    import pandas as pd

    class FSSDPyfuncModel(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc wrapper of :class:`fssd.predictor.Predictor` (see the module docstring)."""

        def load_context(self, context):
            from fssd.predictor import Predictor

            self.predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

        def predict(self, context, model_input, params=None):
            if not hasattr(self, "predictor"):
                raise RuntimeError("FSSDPyfuncModel.predict before load_context; load it with mlflow.pyfunc.load_model")
            images = _images_from_input(model_input)
            threshold = (params or {}).get("score_threshold")
            dets = self.predictor.predict(images, score_threshold=None if threshold is None else float(threshold))
            return detections_frame(dets)

        # A DataFrame hint (a real object: this module's annotations are strings) tells MLflow not
        # to infer a schema from type hints; the explicit signature validates the input.
        predict.__annotations__ = {"model_input": pd.DataFrame}

    FSSDPyfuncModel.__qualname__ = "FSSDPyfuncModel"
    FSSDPyfuncModel.__module__ = __name__
    return FSSDPyfuncModel


def _pyfunc_class() -> type:
    cls = globals().get("FSSDPyfuncModel")
    if cls is None:
        cls = globals()["FSSDPyfuncModel"] = _define_pyfunc_model()
    return cls


def __getattr__(name: str) -> Any:
    # PEP 562: the class is built on first access and cached, so pickling it by reference
    # (pipeline.register.FSSDPyfuncModel) and unpickling it both resolve to this one class.
    if name == "FSSDPyfuncModel":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# logging helpers


def pip_requirements() -> list[str]:
    """The model's runtime requirements, pinned to the installed versions (no inference)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "torchvision", "numpy", "pandas", "opencv-python-headless", "albumentations"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def model_signature(score_threshold: float):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.binary, "image")])
    outputs = Schema([
        ColSpec(DataType.long, "image_index"),
        ColSpec(DataType.long, "label"),
        ColSpec(DataType.string, "name"),
        *[ColSpec(DataType.double, c) for c in ("score", "x1", "y1", "x2", "y2")],
    ])
    params = ParamSchema([ParamSpec("score_threshold", DataType.double, float(score_threshold))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _input_example():
    import cv2
    import numpy as np
    import pandas as pd

    img = np.full((64, 96, 3), 127, dtype=np.uint8)
    cv2.rectangle(img, (20, 16), (60, 48), (40, 200, 90), -1)
    ok, buf = cv2.imencode(".png", img)
    return pd.DataFrame({"image": [buf.tobytes()]})


def _slim_checkpoint(src: Path, dst: Path) -> dict[str, Any]:
    """Copy of a checkpoint without the training state (optimizer, RNG, ...); returns its payload."""
    from fssd.checkpoint import load_model, save_checkpoint

    model, payload = load_model(src)
    save_checkpoint(dst, model, payload["config"], payload["class_names"], meta=payload.get("meta") or {})
    return payload


def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def decide_alias(new_map: float | None, champion_version: str | None, champion_map: float | None) -> tuple[bool, str]:
    """(move the alias?, why): only a strictly better test mAP takes the alias; a tie keeps it."""
    if champion_version is None:
        return True, "no current champion"
    if new_map is None:
        return False, "this version has no test map_voc07; the champion stays"
    if champion_map is None:
        return False, (f"the champion (version {champion_version}) has no {MAP_TAG} tag to compare with "
                       "(set by hand?); it stays")
    if new_map > champion_map:
        return True, f"test map_voc07 {new_map:.6g} beats the champion's {champion_map:.6g}"
    if new_map == champion_map:
        return False, f"test map_voc07 {new_map:.6g} ties the champion's; the champion stays"
    return False, f"test map_voc07 {new_map:.6g} is below the champion's {champion_map:.6g}"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist; run the evaluate stage first (dvc repro evaluate)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); re-run the stage that writes it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return data


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (start_run, log_model) at ``uri`` for a while, then put back both
    the global URI and ``MLFLOW_TRACKING_URI`` exactly as they were (``mlflow.set_tracking_uri``
    alone would leave them changed for the rest of the process)."""
    import mlflow

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global = getattr(tracking_utils, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _log_model(mlflow: Any, uri: str, run_id: str, name: str, checkpoint: Path, payload: Mapping[str, Any]) -> Any:
    """``mlflow.pyfunc.log_model`` of the FSSD pyfunc under ``run_id``, registered as ``name``."""
    cfg = payload["config"]
    with _fluent_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=_pyfunc_class()(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(_REPO_PACKAGES / "fssd"), str(_REPO_PACKAGES / "pipeline")],
            signature=model_signature(cfg.postprocess.score_threshold),
            input_example=_input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=name,
            metadata={"class_names": list(payload["class_names"]), "input_size": cfg.model.input_size,
                      "format": "fssd-pyfunc/1"},
        )


# --------------------------------------------------------------------------------------------
# the stage


def run_register(
    params: Any,
    *,
    checkpoint: Path = Path("models/fssd.pt"),
    eval_metrics: Mapping[str, Any] | Path = Path("metrics/eval.json"),
    out: Path = Path("metrics/register.json"),
    train_metrics: Path | None = Path("metrics/train.json"),
    run_id: str | None = None,
) -> dict[str, Any]:
    """The `register` stage (see the module docstring). Returns what it wrote to ``out``.

    Args:
        params: the pipeline :class:`~pipeline.params.Params` (``register.*``, ``mlflow.*``, ``data.root``).
        checkpoint: the checkpoint to log.
        eval_metrics: the evaluate stage's metrics, as a dict or the path of ``eval.json``.
        out: where the summary goes.
        train_metrics: fallback source of the training run id (``mlflow_run_id``).
        run_id: the MLflow run to log the model under (default: ``eval_metrics['mlflow_run_id']``,
            else ``train_metrics``'; a new run tagged ``fssd.stage=register`` when none exists).
    """
    import time

    import mlflow

    started = time.time()
    from mlflow.exceptions import MlflowException

    from . import tracking
    from .evaluate import _read_run_id, mlflow_metrics, resolve_run

    checkpoint = Path(checkpoint)
    metrics = dict(eval_metrics) if isinstance(eval_metrics, Mapping) else _read_json(Path(eval_metrics), "eval metrics")
    new_map = _float_or_none(metrics.get("map_voc07"))
    name, alias = params.register.model_name, params.register.alias
    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri)
    processed = Path(params.data.root) / "processed"
    client = tracking.client(uri)

    tmp = Path(tempfile.mkdtemp(prefix="fssd-register-"))
    try:
        slim = tmp / "fssd.pt"
        payload = _slim_checkpoint(checkpoint, slim)  # a bad checkpoint fails before MLflow is touched

        wanted = run_id or metrics.get("mlflow_run_id") or _read_run_id(train_metrics)
        run_id, created = resolve_run(uri, params.mlflow.experiment, wanted, stage="register",
                                      processed_dir=processed)
        # the current champion, before anything changes
        champion_version = champion_map = None
        try:
            mv = client.get_model_version_by_alias(name, alias)
            champion_version = str(mv.version)
            champion_map = _float_or_none((mv.tags or {}).get(MAP_TAG))
        except MlflowException:
            pass

        prior_status = client.get_run(run_id).info.status
        try:
            info = _log_model(mlflow, uri, run_id, name, slim, payload)
        finally:
            # start_run/end_run marks the (training) run FINISHED, or FAILED on an error here: a
            # failed registration must not relabel the training run, so its status is restored
            if prior_status in ("FINISHED", "FAILED", "KILLED") and client.get_run(run_id).info.status != prior_status:
                client.set_terminated(run_id, status=prior_status)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if created:
        client.set_terminated(run_id, status="FINISHED")
    version = str(info.registered_model_version)

    tags = {k: repr(v) for k, v in mlflow_metrics(metrics).items()}
    if new_map is not None:
        tags[MAP_TAG] = repr(new_map)
    tags.update(tracking.provenance_tags(processed))
    if "git.commit" not in tags:
        commit = tracking.git_commit(_REPO_PACKAGES)
        if commit:
            tags["git.commit"] = commit
    tags["fssd.run_id"] = run_id
    tags["fssd.checkpoint"] = str(checkpoint)
    tags["fssd.classes"] = ",".join(payload["class_names"])[:5000]
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))

    move, reason = decide_alias(new_map, champion_version, champion_map)
    if move:
        client.set_registered_model_alias(name, alias, version)
    summary = {
        "model_name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "model_id": getattr(info, "model_id", None),
        "mlflow_run_id": run_id,
        "map_voc07": new_map,
        "alias": alias,
        "alias_moved": move,
        "champion_version": int(version) if move else (int(champion_version) if champion_version else None),
        "previous_champion_version": int(champion_version) if champion_version else None,
        "previous_champion_map_voc07": champion_map,
        "reason": reason,
    }
    summary["seconds"] = round(time.time() - started, 1)
    atomic_write_json(Path(out), summary)
    return summary


# --------------------------------------------------------------------------------------------
# CLI


def _cmd_register(args: argparse.Namespace) -> int:
    from .params import load_params, parse_set

    try:
        params = load_params(args.params, parse_set(args.set or []))
        s = run_register(params, checkpoint=Path(args.checkpoint), eval_metrics=Path(args.eval_metrics),
                         out=Path(args.out), train_metrics=Path(args.train_metrics), run_id=args.run_id)
    except (ValueError, FileNotFoundError) as e:  # bad params, checkpoint or metrics: the message names it
        print(f"fssd register: error: {e}", file=sys.stderr, flush=True)
        return 2
    moved = (f"alias {s['alias']!r} now on version {s['version']}" if s["alias_moved"]
             else f"alias {s['alias']!r} stays on version {s['champion_version']}")
    print(f"[fssd] registered {s['model_name']} version {s['version']} (test mAP {s['map_voc07']}); {moved}: "
          f"{s['reason']}; wrote {args.out}", flush=True)
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``fssd register`` to the ``fssd`` console script's subparsers."""
    from .params import add_params_args

    p = subparsers.add_parser("register", help="log the model to MLflow, register a version, move the champion alias")
    add_params_args(p, "register.alias=staging")
    p.add_argument("--checkpoint", default="models/fssd.pt")
    p.add_argument("--eval-metrics", default="metrics/eval.json")
    p.add_argument("--train-metrics", default="metrics/train.json")
    p.add_argument("--out", default="metrics/register.json")
    p.add_argument("--run-id", default=None, help="MLflow run to log the model under (default: the training run)")
    p.set_defaults(func=_cmd_register)
