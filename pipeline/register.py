"""The `register` stage: log the model as an MLflow pyfunc, register it, move the champion alias.

* The model is logged with :func:`mlflow.pyfunc.log_model` under the training run (its id is in
  ``metrics/eval.json`` / ``metrics/train.json``) as ``model``: an :class:`FSSDPyfuncModel` whose
  artifact ``checkpoint`` is a slim copy of ``models/fssd.pt`` (weights, config, class names; no
  optimizer state), with the ``fssd`` and ``pipeline`` packages as ``code_paths`` (the model loads
  where they are not installed) and explicit pinned ``pip_requirements`` (no inference, no network).
* It is registered as a new version of ``register.model_name``, created together with its tags
  (one ``create_model_version`` call: test metrics, ``test_map_voc07``, the data hash, the git
  commit, ``fssd.run_id``), so no one ever sees the version without its test mAP. A version
  without a finite test mAP gets ``test_map_voc07 = nan``.
* The alias ``register.alias`` (``champion``) is then settled by :func:`claim_alias` (below).
* ``metrics/register.json`` says what happened.

The champion
------------
Rule: the alias points at the registered version with the highest finite ``test_map_voc07`` tag
(:func:`best_version`). A version without a finite test mAP (missing, NaN, inf) never becomes
champion, and a champion without one (a pipeline version of an older release, registered without
a mAP) is replaced by any version with one. Only a strictly better mAP takes the alias: a tie
keeps the current champion (and where the current champion is not among the best, the earliest
best version wins, so that every process computes the same answer). A champion chosen by hand
that has neither a ``test_map_voc07`` nor an ``fssd.run_id`` tag is left alone. To keep a version
from ever being champion, set its ``test_map_voc07`` tag to ``nan`` (or delete the version).

Race freedom: MLflow has no compare-and-set for aliases, so two registrations at once could each
read the old champion, decide, and write: the slower write wins even when it is the worse model.
:func:`claim_alias` therefore never trusts a decision it has written: after every write it reads
the alias and all versions again, decides again, and stops only on a read that needs no write.
Why that ends on the best version, once every registration has returned: take the last write W to
the alias, by process X. X read again after W and found the alias (still W's value: no write came
later) best among all versions it saw, and it saw every version whose creation was complete before
that read. Any version u is created, with its tag, before its own process P first reads. If P's
last read came after W, P saw W's value best with u in view; if it came before W, u already
existed when X made its final read, so X saw W's value best with u in view. Either way W's value
is at least as good as u. Each process writes at most once per read and a write is only needed
while some process read a stale view, so the loop ends after a few rounds (bounded; an error if
not). A write that fails because another process created the alias at the same instant (the SQL
stores answer the second insert with a unique-key error) is followed by a read like any other.

What this needs of the store (a remote ``mlflow server`` included): one linearizable database
behind every server worker (SQLite, PostgreSQL, MySQL: a write is visible to every read that starts
after it returns; no read replicas or caches that lag), tags written in the same call that
creates the version (the REST API and the SQL stores do), and every process that sets the alias
going through :func:`claim_alias`: a person moving the alias in the UI during a registration, or
an older release of this stage, is not covered. No lock is taken, so a crashed registration leaves
nothing to clean up.

The pyfunc model
----------------
Input: a DataFrame with one column ``image``: encoded image files (JPEG, PNG, ... as ``bytes``;
base64 strings are accepted too, as JSON serving sends them) or RGB ``uint8`` arrays [H, W, 3].
Called directly (``model.unwrap_python_model().predict(None, images)``) it also takes a list of
such images. Optional param ``score_threshold``.
Output: a DataFrame with one row per detection: ``image_index`` (row of the input), ``label``
(1..K), ``category_id`` (the dataset's own id of that class), ``name``, ``score``, ``x1``, ``y1``,
``x2``, ``y2`` (pixels of that image).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.io import atomic_write_json

__all__ = [
    "FSSDPyfuncModel",
    "OUTPUT_COLUMNS",
    "run_register",
    "decide_alias",
    "claim_alias",
    "best_version",
    "version_standing",
    "pip_requirements",
    "model_signature",
    "add_cli",
]

OUTPUT_COLUMNS = ("image_index", "label", "category_id", "name", "score", "x1", "y1", "x2", "y2")
CHECKPOINT_ARTIFACT = "checkpoint"
MAP_TAG = "test_map_voc07"
RUN_TAG = "fssd.run_id"  # every version this stage registers carries it
# errors of a write to the alias after which claim_alias reads and decides again
_RETRY_CODES = frozenset({"BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"})
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
        cols["category_id"].extend(int(v) for v in det.get("category_ids", det["labels"]))
        cols["name"].extend(str(v) for v in det["names"])
        cols["score"].extend(float(v) for v in det["scores"])
        for j, c in enumerate(("x1", "y1", "x2", "y2")):
            cols[c].extend(boxes[:, j].tolist())
    return pd.DataFrame({
        "image_index": np.asarray(cols["image_index"], dtype=np.int64),
        "label": np.asarray(cols["label"], dtype=np.int64),
        "category_id": np.asarray(cols["category_id"], dtype=np.int64),
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
        ColSpec(DataType.long, "category_id"),
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


def decide_alias(new_map: float | None, champion_version: str | None, champion_map: float | None,
                 *, champion_pinned: bool = False) -> tuple[bool, str]:
    """(does a new version take the alias from the champion?, why), the rule for one pair.

    ``new_map``/``champion_map``: finite test mAPs or None (missing, NaN, inf). A version without
    one never takes the alias; a champion without one is replaced by any version with one, unless
    ``champion_pinned`` (chosen by hand: it has no mAP tag and was not registered by this stage).
    Only a strictly better mAP takes the alias; a tie keeps the champion.
    """
    new_map, champion_map = _float_or_none(new_map), _float_or_none(champion_map)
    if new_map is None:
        return False, "this version has no finite test map_voc07, so it never becomes champion"
    if champion_version is None:
        return True, "no current champion"
    if champion_map is None:
        if champion_pinned:
            return False, (f"the champion (version {champion_version}) has no {MAP_TAG} tag to compare with "
                           "(set by hand?); it stays")
        return True, (f"test map_voc07 {new_map:.6g} replaces a champion (version {champion_version}) "
                      "without a finite one")
    if new_map > champion_map:
        return True, f"test map_voc07 {new_map:.6g} beats the champion's {champion_map:.6g}"
    if new_map == champion_map:
        return False, f"test map_voc07 {new_map:.6g} ties the champion's; the champion stays"
    return False, f"test map_voc07 {new_map:.6g} is below the champion's {champion_map:.6g}"


def version_standing(tags: Mapping[str, str] | None) -> tuple[bool, float | None]:
    """(is this version judged by its test mAP?, that finite mAP or None), from its tags.

    Judged: it has a ``test_map_voc07`` tag, or it was registered by this stage (``fssd.run_id``).
    A version that is not judged and holds the alias was put there by hand (pinned)."""
    tags = tags or {}
    judged = MAP_TAG in tags or RUN_TAG in tags
    return judged, _float_or_none(tags.get(MAP_TAG))


def best_version(scores: Mapping[str, float | None], current: str | None = None) -> str | None:
    """The version the alias should point at: the highest finite score; on a tie the ``current``
    champion if it is among the best, else the earliest (lowest version number). None when no
    version has a finite score. ``scores``: version -> test mAP (None/NaN: never champion)."""
    finite = {str(v): f for v, m in scores.items() if (f := _float_or_none(m)) is not None}
    if not finite:
        return None
    top = max(finite.values())
    if current is not None and finite.get(str(current)) == top:
        return str(current)
    return min((v for v, m in finite.items() if m == top), key=int)


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases or {}
    v = aliases.get(alias)
    return None if v is None else str(v)


def _all_version_tags(client: Any, name: str) -> dict[str, dict[str, str]]:
    """version -> tags of every version of ``name`` (all pages)."""
    quote = '"' if "'" in name else "'"
    out: dict[str, dict[str, str]] = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = {quote}{name}{quote}", page_token=token)
        for mv in page:
            out[str(mv.version)] = dict(mv.tags or {})
        token = getattr(page, "token", None)
        if not token:
            return out


def claim_alias(client: Any, name: str, alias: str, version: str | int | None = None, *,
                max_rounds: int = 20) -> dict[str, Any]:
    """Settle ``alias`` of registered model ``name`` on its best version; race-free.

    Reads the alias and every version's ``test_map_voc07`` tag, points the alias at
    :func:`best_version` when it is not there already, and after each write reads and decides
    again, until a read needs no write (the argument is in the module docstring). A champion set
    by hand (see :func:`version_standing`) is left alone. ``version``: the caller's own version,
    for the report.

    Returns ``champion_version`` (str or None) and ``champion_map_voc07`` as last read, ``pinned``
    (the champion was set by hand and left alone), ``writes`` (the versions this call pointed the
    alias at, in order) and ``rounds``.
    """
    from mlflow.exceptions import MlflowException

    writes: list[str] = []
    failed: Exception | None = None
    for rounds in range(1, max_rounds + 1):
        current = _alias_version(client, name, alias)
        versions = _all_version_tags(client, name)  # read after the alias: it holds every version created before
        if current is not None and current not in versions:
            current = None  # its version was deleted between the two reads
        pinned = current is not None and not version_standing(versions[current])[0]
        target = current if pinned else best_version({v: version_standing(t)[1] for v, t in versions.items()}, current)
        if target == current:
            return {"version": None if version is None else str(version), "champion_version": current,
                    "champion_map_voc07": version_standing(versions[current])[1] if current else None,
                    "pinned": pinned, "writes": writes, "rounds": rounds}
        try:
            client.set_registered_model_alias(name, alias, target)
        except MlflowException as e:
            # Two first writes of an alias at once: the store's insert of one fails on the unique
            # key (BAD_REQUEST, "UNIQUE constraint failed"); or the target was deleted meanwhile.
            # The other writer's value stands or ours did: either way, read and decide again.
            if e.error_code not in _RETRY_CODES:
                raise
            failed = e
            time.sleep(random.uniform(0.01, 0.1))
            continue
        writes.append(target)
    raise RuntimeError(f"the alias {alias!r} of registered model {name!r} did not settle in {max_rounds} rounds "
                       f"(this process pointed it at versions {writes}); are other processes moving it without "
                       "pipeline.register.claim_alias?") from failed


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


def _log_model(mlflow: Any, uri: str, run_id: str, name: str, checkpoint: Path, payload: Mapping[str, Any],
               tags: Mapping[str, str]) -> tuple[Any, Any]:
    """``mlflow.pyfunc.log_model`` of the FSSD pyfunc under ``run_id``, then a new version of ``name``
    created with ``tags`` in the same call (never visible without them). Returns (model info, version)."""
    cfg = payload["config"]
    with _fluent_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_pyfunc_class()(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(_REPO_PACKAGES / "fssd"), str(_REPO_PACKAGES / "pipeline")],
            signature=model_signature(cfg.postprocess.score_threshold),
            input_example=_input_example(),
            pip_requirements=pip_requirements(),
            metadata={"class_names": list(payload["class_names"]), "input_size": cfg.model.input_size,
                      "format": "fssd-pyfunc/1"},
        )
        mv = mlflow.register_model(info.model_uri, name, tags=dict(tags))
    return info, mv


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

        # every tag goes in with the version, the test mAP included ("nan" when there is none)
        tags = {k: repr(v) for k, v in mlflow_metrics(metrics).items()}
        tags[MAP_TAG] = repr(new_map) if new_map is not None else "nan"
        tags.update(tracking.provenance_tags(processed))
        if "git.commit" not in tags:
            commit = tracking.git_commit(_REPO_PACKAGES)
            if commit:
                tags["git.commit"] = commit
        tags[RUN_TAG] = run_id
        tags["fssd.checkpoint"] = str(checkpoint)
        tags["fssd.classes"] = ",".join(payload["class_names"])[:5000]
        tags = {k: str(v) for k, v in tags.items()}

        prior_status = client.get_run(run_id).info.status
        try:
            info, mv = _log_model(mlflow, uri, run_id, name, slim, payload, tags)
        finally:
            # start_run/end_run marks the (training) run FINISHED, or FAILED on an error here: a
            # failed registration must not relabel the training run, so its status is restored
            if prior_status in ("FINISHED", "FAILED", "KILLED") and client.get_run(run_id).info.status != prior_status:
                client.set_terminated(run_id, status=prior_status)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if created:
        client.set_terminated(run_id, status="FINISHED")
    version = str(mv.version)

    settled = claim_alias(client, name, alias, version)
    final, final_map = settled["champion_version"], settled["champion_map_voc07"]
    move = final == version
    if new_map is None:
        reason = decide_alias(None, final, final_map)[1]
    elif settled["pinned"]:
        reason = decide_alias(new_map, final, None, champion_pinned=True)[1]
    elif move:
        took, reason = decide_alias(new_map, champion_version, champion_map)
        if not took:  # the alias had been set by hand on a version below the best registered
            reason = f"test map_voc07 {new_map:.6g} is the best registered"
    else:
        reason = decide_alias(new_map, final, final_map)[1]
        if final != champion_version:  # another registration, at the same time, took it
            reason += f" (version {final}, the best registered)"
    summary = {
        "model_name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "model_id": getattr(info, "model_id", None),
        "mlflow_run_id": run_id,
        "map_voc07": new_map,
        "alias": alias,
        "alias_moved": move,
        "champion_version": int(final) if final is not None else None,
        "previous_champion_version": int(champion_version) if champion_version else None,
        "previous_champion_map_voc07": champion_map,
        "reason": reason,
        "alias_writes": [int(v) for v in settled["writes"]],
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
             else f"alias {s['alias']!r} on version {s['champion_version']}" if s["champion_version"] is not None
             else f"no version holds alias {s['alias']!r}")
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
