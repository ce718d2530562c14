"""The `tune` stage: a Ray Tune search over params, each trial one Ray Train V2 run.

Driver (:func:`run_search`): validates ``tune.space`` before anything starts, joins or starts
Ray, runs (or resumes) a :class:`ray.tune.Tuner` whose function trainable drives one
``TorchTrainer`` per trial (:func:`pipeline.train.fit` with a ``TuneReportCallback``), early-stops
weak trials with ASHA on the per-epoch ``val_map``, then writes ``tune/best.json`` (the best
trial's overrides and a local copy of its best checkpoint) and ``metrics/tune.json``.

The search space (``tune.space`` in params.yaml) maps a dotted params key to one distribution::

    model.fusion_channels: {choice: [32, 64, 128]}
    priors.min_scale: {uniform: [0.1, 0.3]}
    train.lr: {loguniform: [0.005, 0.05]}
    train.batch_size: {grid: [16, 32]}
    seed: {randint: [0, 9]}          # both bounds inclusive

Every sampled point goes through the same override + validation code as ``--set``.

MLflow: one parent run per search (resumed by the search name) with a nested child run per
trial, all written by :class:`MlflowTrialLogger` in the Tune driver process only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from . import tracking
from .errors import MissingFileError, UserError
from .params import ParamsError, Params, add_params_args, apply_overrides, flatten, load_params, parse_set

__all__ = [
    "SpaceEntry",
    "TuneSearchError",
    "MlflowTrialLogger",
    "validate_space",
    "param_space",
    "expected_trials",
    "search_name",
    "trial_resources",
    "run_search",
    "init_ray",
    "add_cli",
    "handler",
]

METRIC = "val_map"
MODE = "max"
KINDS = ("choice", "uniform", "loguniform", "randint", "grid")
_ALIASES = {"grid_search": "grid"}
# Keys the tune stage sets itself for every trial; searching them would be silently overridden.
_CONTROLLED = {
    "train.epochs": "trials run tune.epochs epochs",
    "train.val_every": "trials validate every epoch (ASHA compares val_map at every rung)",
    "train.num_workers": "trials use tune.num_workers workers",
    "train.cpus_per_worker": "trials use tune.cpus_per_worker",
}
# Test hook: JSON {"dotted.key=value": offset} added to the val_map a matching trial reports to
# Tune, so a test can give ASHA distinct scores (a few CPU steps all score 0.0).
TEST_SCORE_OFFSETS_ENV = "FSSD_TUNE_TEST_SCORE_OFFSETS"
_EPOCH_METRICS = ("loss", "loss_loc", "loss_conf", "lr", "images_per_second", "epoch_seconds", "bad_steps", "val_map")
_DONE = ("TERMINATED", "ERROR")


class TuneSearchError(UserError, RuntimeError):
    """The search ran but produced no usable trial (every trial failed)."""


@dataclass(frozen=True)
class SpaceEntry:
    """One searched key: ``kind`` is choice/uniform/loguniform/randint/grid; ``args`` its values
    (choice, grid) or inclusive bounds (uniform, loguniform, randint)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    @property
    def finite(self) -> bool:
        return self.kind in ("choice", "grid")


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_entry(key: str, spec: Any) -> SpaceEntry:
    where = f"tune.space.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ParamsError(f"{where} must be a mapping with one distribution, e.g. {{choice: [a, b]}} or "
                          f"{{uniform: [low, high]}}; got {spec!r}")
    (kind, args), = spec.items()
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ParamsError(f"{where}: unknown distribution kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ParamsError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return SpaceEntry(key, kind, tuple(args))
    if not isinstance(args, (list, tuple)) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise ParamsError(f"{where}: {kind} needs [low, high] (two numbers), got {args!r}")
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ParamsError(f"{where}: randint needs integer bounds, got {args!r}")
    if low > high:
        raise ParamsError(f"{where}: {kind} min {low!r} > max {high!r}")
    if kind == "loguniform" and low <= 0:
        raise ParamsError(f"{where}: loguniform needs bounds > 0, got {args!r}")
    if kind in ("uniform", "loguniform"):
        low, high = float(low), float(high)
    return SpaceEntry(key, kind, (low, high))


def _read_raw(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"{p} does not exist; run from the project root or pass --params PATH")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{p} must hold a mapping at the top level")
    return raw


def trial_overrides(params: Params, cpus_per_worker: float | None = None) -> dict[str, Any]:
    """What the tune stage sets in every trial, on top of the user's overrides."""
    out: dict[str, Any] = {
        "train.val_every": 1,
        "train.select": "best",  # a trial's checkpoint is its best validation epoch
        "train.num_workers": params.tune.num_workers,
        "data.root": str(Path(params.data.root).resolve()),
    }
    if params.tune.max_train_images is not None:
        out["train.max_images"] = params.tune.max_train_images
    if cpus_per_worker is not None:
        out["train.cpus_per_worker"] = float(cpus_per_worker)
    return out


def validate_space(params_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> tuple[Params, list[SpaceEntry]]:
    """Load params and check ``tune.space`` without starting anything.

    Every key must be a params key (checked with :func:`apply_overrides`, as ``--set`` does),
    every distribution well formed, and every choice/grid value and every bound must pass
    :func:`load_params` as an override of that key. Raises :class:`ParamsError` naming the key.
    """
    overrides = dict(overrides or {})
    params = load_params(params_path, overrides)
    space = params.tune.space
    if not space:
        raise ParamsError("tune.space is empty; add at least one dotted key to search, "
                          "e.g. model.fusion_channels: {choice: [32, 64]}")
    raw = apply_overrides(_read_raw(params_path), overrides)
    fixed = {**overrides, **trial_overrides(params)}
    entries = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not isinstance(key, str) or not key:
            raise ParamsError(f"tune.space keys must be dotted params keys, got {key!r}")
        if key == "tune" or key.startswith("tune."):
            raise ParamsError(f"{where}: the search cannot change the tune stage's own settings")
        if key in _CONTROLLED:
            raise ParamsError(f"{where}: the tune stage sets this key itself ({_CONTROLLED[key]})")
        entry = _parse_entry(key, spec)
        try:
            apply_overrides(raw, {key: entry.args[0]})
        except ParamsError as e:
            raise ParamsError(f"{where}: not a params key: {e}") from None
        for value in entry.args:  # every listed value, or both bounds
            try:
                load_params(params_path, {**fixed, key: value})
            except ParamsError as e:
                raise ParamsError(f"{where}: {entry.kind} value {value!r} is invalid: {e}") from None
        entries.append(entry)
    search = params.tune.search
    if search == "optuna" and any(e.kind == "grid" for e in entries):
        keys = ", ".join(e.key for e in entries if e.kind == "grid")
        raise ParamsError(f"tune.search is 'optuna', which cannot run grid entries ({keys}); use choice instead")
    if search == "grid":
        infinite = [e for e in entries if not e.finite]
        if infinite:
            e = infinite[0]
            raise ParamsError(f"tune.space.{e.key}: tune.search is 'grid', which needs choice or grid values, "
                              f"not {e.kind}")
    return params, entries


def param_space(entries: Sequence[SpaceEntry], search: str) -> tuple[dict[str, Any], bool]:
    """The Tune param_space (flat, dotted keys) and whether it is a pure grid (run once)."""
    from ray import tune

    space: dict[str, Any] = {}
    for e in entries:
        if e.kind == "grid" or (e.kind == "choice" and search == "grid"):
            space[e.key] = tune.grid_search(list(e.args))
        elif e.kind == "choice":
            space[e.key] = tune.choice(list(e.args))
        elif e.kind == "uniform":
            space[e.key] = tune.uniform(*e.args)
        elif e.kind == "loguniform":
            space[e.key] = tune.loguniform(*e.args)
        else:  # randint, inclusive bounds (Tune's upper bound is exclusive)
            space[e.key] = tune.randint(e.args[0], e.args[1] + 1)
    pure_grid = search == "grid" or all(e.kind == "grid" for e in entries)
    return space, pure_grid


def expected_trials(entries: Sequence[SpaceEntry], search: str, num_samples: int) -> int:
    """How many trials the search runs: the grid's size (grid entries, and choices under
    tune.search=grid) times num_samples, num_samples alone for a pure grid."""
    pure_grid = search == "grid" or all(e.kind == "grid" for e in entries)
    grid = 1
    for e in entries:
        if e.kind == "grid" or (e.kind == "choice" and search == "grid"):
            grid *= len(e.args)
    return grid * (1 if pure_grid else num_samples)


def _plain(v: Any) -> Any:
    """numpy scalars (what Tune samples) to Python values."""
    if hasattr(v, "item") and callable(v.item) and not isinstance(v, (list, tuple, dict)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def search_name(params: Params) -> str:
    """Deterministic from what changes the search's results (:mod:`pipeline.identity`: params,
    train and val data, code, the pretrained file's bytes), so a re-run resumes it and anything
    else starts a new search."""
    from .identity import code_digest, digest, file_digest, train_settings_identity
    from .job import resolve_pretrained

    d = params.to_dict()
    processed = Path(params.data.root) / "processed"
    try:
        data = [file_digest(processed / "train.json"), file_digest(processed / "val.json")]
    except FileNotFoundError:
        raise MissingFileError(f"{processed}/train.json or val.json does not exist; run the convert stage first "
                               "(dvc repro convert)") from None
    identity = {
        "seed": d["seed"],
        "data": {"dataset": d["data"]["dataset"], "splits": data},
        "model": {k: v for k, v in d["model"].items() if k not in ("pretrained", "pretrained_sha256", "init", "init_sha256")},
        "pretrained": resolve_pretrained(params.model)[1],
        "model_init": file_digest(params.model.init) if params.model.init else None,
        "priors": d["priors"],
        "train": train_settings_identity(d["train"], ("epochs", "val_every", "num_workers", "select")),
        "tune": {k: v for k, v in d["tune"].items() if k not in ("storage_path", "cpus_per_worker")},
        "code": code_digest(("pipeline/tune.py",)),
    }
    return f"tune-{params.data.dataset}-{params.model.preset}-{digest(identity)}"


def require_validation_split(params: Params) -> None:
    """A search chooses on validation data: refuse to start without a validation split."""
    from .job import count_images

    val = Path(params.data.root) / "processed" / "val.json"
    if val.is_file() and count_images(val) == 0:
        raise ParamsError(
            f"the search needs a validation split but {val} has no images (data.val_fraction: 0); set "
            "data.val_fraction > 0, or train.use_tuned: false to train without a search"
        )


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


def trial_resources(params: Params, cluster: Mapping[str, float]) -> dict[str, Any]:
    """Workers, CPUs per worker and how many trials fit the cluster at once.

    A trial is ``tune.num_workers`` Ray Train workers, each with ``tune.cpus_per_worker`` CPUs
    (default: all CPUs split over one trial's workers, or 4 per GPU worker) and one GPU when
    ``train.use_gpu``. The Tune trial actor itself only waits on its Train controller and reserves
    no CPU (see :func:`_driver_resources`).
    """
    workers = params.tune.num_workers
    total_cpu = float(cluster.get("CPU", os.cpu_count() or 1))
    use_gpu = params.train.use_gpu
    cpus = params.tune.cpus_per_worker
    if cpus is None:
        cpus = 4.0 if use_gpu else max(1.0, math.floor(total_cpu / workers))
    fits = math.floor(total_cpu / (workers * cpus) + 1e-9)
    if use_gpu:
        fits = min(fits, math.floor(float(cluster.get("GPU", 0)) / workers + 1e-9))
    return {"num_workers": workers, "cpus_per_worker": float(cpus), "use_gpu": use_gpu,
            "max_concurrent_trials": max(1, fits)}


def _driver_resources(cluster: Mapping[str, float]) -> dict[str, float]:
    """The Tune trial actor only drives its Train run (whose controller is itself a 0-CPU actor).
    Tune refuses an all-zero request, so it asks for a sliver of the head node's marker resource
    (which also keeps these drivers off preemptible worker nodes, as Ray's docs advise), or one byte
    of memory where that marker does not exist. Its CPUs stay free for the Train workers: on a
    2-CPU machine one trial with one 2-CPU worker fits."""
    head = "node:__internal_head__"
    if cluster.get(head, 0) > 0:
        return {"CPU": 0, head: 0.001}
    return {"CPU": 0, "memory": 1}


# --------------------------------------------------------------------------------------------
# Trial side (runs in the Tune trial actor)
# --------------------------------------------------------------------------------------------


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _score_offset(offsets: Mapping[str, float], sampled: Mapping[str, Any]) -> float:
    total = 0.0
    for item, offset in offsets.items():
        (key, value), = parse_set([item]).items()
        if key in sampled and sampled[key] == value:
            total += float(offset)
    return total


def _report_callback(offset: float) -> Any:
    from ray.tune.integration.ray_train import TuneReportCallback

    if not offset:
        return TuneReportCallback()

    class _OffsetReportCallback(TuneReportCallback):
        """Test hook: shifts the val_map this trial reports to Tune."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = dict(metrics[0])
            if m.get(METRIC) is not None:
                m[METRIC] = float(m[METRIC]) + offset
            super().after_report(run_context, [m, *metrics[1:]], checkpoint)

    return _OffsetReportCallback()


def _run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial: load params with the sampled overrides, run one TorchTrainer to the end."""
    import ray.tune

    from .train import fit, make_job

    os.chdir(ctx["cwd"])  # relative paths in params mean what they mean to the driver
    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {k: _plain(config[k]) for k in ctx["keys"]}
    params = load_params(ctx["params_path"], {**ctx["overrides"], **sampled})
    job = make_job(params, epochs=ctx["epochs"], run_name=f"{ctx['search']}-{trial_id}", extra_code=("pipeline/tune.py",))
    job.progress = False
    offset = _score_offset(ctx.get("score_offsets") or {}, sampled)
    fit(job, params.train, storage_path=ctx["train_storage"], endpoint_url=params.data.s3.endpoint_url,
        callbacks=[_report_callback(offset)], num_workers=ctx["num_workers"])


# --------------------------------------------------------------------------------------------
# Driver side: MLflow
# --------------------------------------------------------------------------------------------

# search name -> (tracking uri, parent run id) of the search running in this process. The
# callback is pickled into the Tuner's state; a restored Tuner gets this process's values.
_ACTIVE: dict[str, tuple[str, str]] = {}


def _find_run(uri: str, experiment: str, key: str) -> str | None:
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(uri, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`fssd.run_key` = '{key}'", max_results=1,
                          order_by=["attributes.start_time DESC"])
    if not found:
        return None
    run = found[0]
    if run.info.status != "RUNNING":
        c.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _open_run(uri: str, experiment: str, *, key: str, run_name: str, tags: Mapping[str, str],
              parent_run_id: str | None = None) -> tuple[str, bool]:
    """The run tagged ``fssd.run_key = key`` in any state (reopened), else a new one."""
    run_id = _find_run(uri, experiment, key)
    if run_id is not None:
        c = tracking.client(uri)
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        return run_id, True
    return tracking.find_or_create_run(uri, experiment, key=key, run_name=run_name, tags=tags,
                                       parent_run_id=parent_run_id)


def _warn(what: str, e: BaseException) -> None:
    print(f"[fssd] tune: MLflow {what} failed ({type(e).__name__}: {e}); the search goes on", file=sys.stderr, flush=True)


class _MlflowTrialLogger:
    """A nested MLflow child run per trial, written from the Tune driver only (one SQLite writer).

    ``on_trial_start`` opens the child (``mlflow.parentRunId`` = the search's run; a resumed
    trial reopens its own), ``on_trial_result`` logs the epoch's metrics at ``step=epoch``,
    ``on_trial_complete``/``on_trial_error`` close it FINISHED/FAILED. MLflow errors are reported
    and do not stop the search.
    """

    def __init__(self, tracking_uri: str, experiment: str, search: str, parent_run_id: str, epochs: int,
                 keys: Sequence[str]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.search = search
        self.parent_run_id = parent_run_id
        self.epochs = epochs
        self.keys = list(keys)
        self._runs: dict[str, str] = {}

    def _target(self) -> tuple[str, str]:
        return _ACTIVE.get(self.search, (self.tracking_uri, self.parent_run_id))

    def _child(self, trial: Any) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            uri, parent = self._target()
            run_id, _ = _open_run(
                uri, self.experiment, key=f"{self.search}/{tid}", run_name=f"{self.search}-{tid}",
                tags={"fssd.stage": "tune-trial", "fssd.search": self.search, "fssd.trial_id": tid,
                      "mlflow.parentRunId": parent},
                parent_run_id=parent,
            )
            self._runs[tid] = run_id
        return self._runs[tid]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            run_id = self._child(trial)
            uri, _ = self._target()
            sampled = {k: _plain(trial.config.get(k)) for k in self.keys}
            tracking.log_params(uri, run_id, {**sampled, "trial_id": trial.trial_id})
        except Exception as e:  # noqa: BLE001
            _warn(f"child run for trial {trial.trial_id}", e)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        try:
            if "epoch" not in result:
                return
            values = {k: float(result[k]) for k in _EPOCH_METRICS
                      if _is_number(result.get(k)) and math.isfinite(float(result[k]))}
            uri, _ = self._target()
            tracking.log_metrics(uri, self._child(trial), values, step=int(result["epoch"]))
        except Exception as e:  # noqa: BLE001
            _warn(f"metrics of trial {trial.trial_id}", e)

    def _close(self, trial: Any, status: str, tags: Mapping[str, str]) -> None:
        try:
            uri, _ = self._target()
            run_id = self._child(trial)
            c = tracking.client(uri)
            for k, v in tags.items():
                c.set_tag(run_id, k, v)
            c.set_terminated(run_id, status=status)
        except Exception as e:  # noqa: BLE001
            _warn(f"closing trial {trial.trial_id}", e)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = int((trial.last_result or {}).get("epoch", 0) or 0)
        status = "TERMINATED" if last >= self.epochs else "EARLY_STOPPED"
        self._close(trial, "FINISHED", {"fssd.trial_status": status, "fssd.last_epoch": str(last)})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", {"fssd.trial_status": "ERROR", "fssd.error": _error_text(trial)[:5000]})


def __getattr__(name: str) -> Any:
    """``MlflowTrialLogger`` (a ray.tune.Callback) is built on first use, so that importing this
    module (every `fssd` command does) does not import Ray Tune."""
    if name == "MlflowTrialLogger":
        from ray.tune import Callback

        cls = type("MlflowTrialLogger", (_MlflowTrialLogger, Callback),
                   {"__module__": __name__, "__qualname__": "MlflowTrialLogger", "__doc__": _MlflowTrialLogger.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _error_text(trial: Any) -> str:
    try:
        text = trial.get_error() or ""
    except Exception:  # noqa: BLE001
        text = ""
    return str(text)


def _error_message(trial: Any) -> str | None:
    """The last line of a trial's traceback (the exception and its message)."""
    text = _error_text(trial).strip()
    if not text:
        return "unknown error" if trial.status == "ERROR" else None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:1000] if lines else None


# --------------------------------------------------------------------------------------------
# Driver side: results
# --------------------------------------------------------------------------------------------


def _storage_fs(storage_path: str, endpoint_url: str | None) -> tuple[str, Any, Any]:
    """(path for RunConfig, filesystem for RunConfig, filesystem to read results with)."""
    import pyarrow.fs

    from .train import storage

    path, fs = storage(storage_path, endpoint_url)
    reader = fs
    if reader is None:
        if storage_path.startswith("s3://"):
            reader, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        else:
            reader = pyarrow.fs.LocalFileSystem()
    return path, fs, reader


def _join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _exists(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _trial_rows(analysis: Any, keys: Sequence[str], epochs: int, fs: Any) -> list[dict[str, Any]]:
    from .train import CHECKPOINT_FILE

    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        df = frames.get(trial.trial_id)
        history: list[dict[str, Any]] = []
        if df is not None and len(df) and "epoch" in df.columns:
            history = df.to_dict("records")
        last_epoch = max((int(h["epoch"]) for h in history if _is_number(h.get("epoch"))), default=0)
        scored = [h for h in history if _is_number(h.get(METRIC)) and not math.isnan(float(h[METRIC]))]
        best_map = max((float(h[METRIC]) for h in scored), default=None)
        checkpoint = None
        for h in sorted(scored, key=lambda h: (float(h[METRIC]), int(h["epoch"])), reverse=True):
            path = h.get("checkpoint_path")
            if isinstance(path, str) and path and _exists(fs, f"{path}/{CHECKPOINT_FILE}"):
                checkpoint = {"path": f"{path}/{CHECKPOINT_FILE}", "epoch": int(h["epoch"]), METRIC: float(h[METRIC])}
                break
        status = trial.status
        if status == "TERMINATED" and last_epoch < epochs:
            status = "EARLY_STOPPED"
        rows.append({
            "trial_id": trial.trial_id,
            "status": status,
            "config": {k: _plain(trial.config.get(k)) for k in keys},
            "last_epoch": last_epoch,
            "best_val_map": best_map,
            "error": _error_message(trial) if trial.status == "ERROR" else None,
            "_checkpoint": checkpoint,
        })
    return rows


def _pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest best val_map; ties go to the trial that trained longest, then the earlier trial."""
    ok = [(i, r) for i, r in enumerate(rows) if r["best_val_map"] is not None and r["_checkpoint"] is not None]
    if not ok:
        return None
    return max(ok, key=lambda ir: (ir[1]["best_val_map"], ir[1]["last_epoch"], -ir[0]))[1]


def _copy_checkpoint(fs: Any, src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with fs.open_input_stream(src) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, length=1 << 20)
    os.replace(tmp, dst)


def plot_scores(rows: Sequence[dict[str, Any]], keys: Sequence[str], out: Path, best_trial: str | None = None) -> Path:
    """One subplot per searched key: each scored trial's best val_map against its value there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [r for r in rows if r["best_val_map"] is not None]
    n = max(1, len(keys))
    fig = Figure(figsize=(4.2 * n, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, key in zip(axes, keys):
        xs = [r["config"].get(key) for r in scored]
        ys = [r["best_val_map"] for r in scored]
        numeric = all(_is_number(x) for x in xs)
        if numeric:
            pos = xs
        else:
            labels = sorted({json.dumps(x, sort_keys=True) for x in xs})
            pos = [labels.index(json.dumps(x, sort_keys=True)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        colors = ["tab:red" if r["status"] == "EARLY_STOPPED" else "tab:blue" for r in scored]
        ax.scatter(pos, ys, c=colors, s=30)
        for p, y, r in zip(pos, ys, scored):
            if r["trial_id"] == best_trial:
                ax.scatter([p], [y], marker="*", s=220, facecolors="none", edgecolors="gold", linewidths=1.5)
        ax.set_xlabel(key)
        ax.set_ylabel("best val mAP@0.5")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(scored)} scored trial(s); red: early-stopped, star: best", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _check_search_backend(params: Params) -> None:
    """``tune.search: optuna`` needs Optuna: say so before anything starts (and before Ray loads)."""
    if params.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ParamsError("tune.search is 'optuna' but optuna is not installed; add it with "
                              "`uv add optuna` (or `uv sync --extra optuna`), or use tune.search: random") from None


def _search_alg(params: Params, max_concurrent: int = 0) -> tuple[Any, int | None]:
    """(search algorithm, TuneConfig.max_concurrent_trials). Tune applies max_concurrent_trials to
    Searchers (Optuna) only; the variant generator (random and grid search) takes it itself."""
    _check_search_backend(params)
    if params.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=params.seed), (max_concurrent or None)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=params.seed), None


def init_ray(num_cpus: int | None = None) -> None:
    """:func:`pipeline.train.init_ray` (imported lazily: Ray loads only when a search runs)."""
    from .train import init_ray as _init_ray

    _init_ray(num_cpus)


def dashboard_env_set() -> bool:
    """Whether this job's actors know their dashboard's address (see :func:`pipeline.train.init_ray`)."""
    import ray

    env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    return "RAY_API_SERVER_ADDRESS" in env


def _score_offsets_from_env() -> dict[str, float]:
    raw = os.environ.get(TEST_SCORE_OFFSETS_ENV)
    return {str(k): float(v) for k, v in json.loads(raw).items()} if raw else {}


def run_search(
    params_path: str | os.PathLike = "params.yaml",
    overrides: Mapping[str, Any] | None = None,
    *,
    best_out: Path = Path("tune/best.json"),
    checkpoint_out: Path = Path("tune/best_checkpoint.pt"),
    metrics_out: Path = Path("metrics/tune.json"),
    plot_out: Path | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> dict[str, Any]:
    """The `tune` stage. Returns a summary; ``summary["interrupted"]`` is True when the search
    was stopped (SIGINT/SIGUSR1) before every trial finished: nothing is written then, and the
    next call with the same params resumes it. Raises :class:`ParamsError` for a bad space
    (before anything starts) and :class:`TuneSearchError` when every trial failed.

    ``extra_callbacks`` (Tune callbacks) join a new search; a resumed search keeps the callbacks
    it was started with (Ray Tune restores them from the experiment directory)."""
    started = time.time()
    params, entries = validate_space(params_path, overrides)
    _check_search_backend(params)
    require_validation_split(params)
    if params.model.init:  # fetched once here (models:/, s3://); every trial starts from the local file
        from .job import resolve_model_init

        overrides = {**dict(overrides or {}), "model.init": resolve_model_init(params), "model.init_sha256": None}
        params = load_params(params_path, overrides)
    tp = params.tune
    keys = [e.key for e in entries]
    name = search_name(params)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .io import atomic_write_json

    init_ray()
    cluster = ray.cluster_resources()
    res = trial_resources(params, cluster)
    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri)
    processed = Path(params.data.root) / "processed"
    parent_id, resumed = _open_run(uri, params.mlflow.experiment, key=name, run_name=name,
                                   tags={"fssd.stage": "tune", "fssd.search": name, **tracking.provenance_tags(processed)})
    tracking.log_params(uri, parent_id, {**flatten(params.to_dict()), "search_name": name,
                                         "tune.max_concurrent_trials": res["max_concurrent_trials"],
                                         "tune.trial_cpus_per_worker": res["cpus_per_worker"]})
    _ACTIVE[name] = (uri, parent_id)

    storage_path, storage_fs, reader_fs = _storage_fs(tp.storage_path, params.data.s3.endpoint_url)
    experiment_path = _join(storage_path, name)
    ctx = {
        "cwd": os.getcwd(),
        "params_path": str(Path(params_path).resolve()),
        "overrides": {**dict(overrides or {}), **trial_overrides(params, res["cpus_per_worker"])},
        "keys": keys,
        "search": name,
        "epochs": tp.epochs,
        "num_workers": res["num_workers"],
        "train_storage": _join(tp.storage_path if "://" in tp.storage_path else str(Path(tp.storage_path).resolve()),
                               f"{name}-trials"),
        "score_offsets": _score_offsets_from_env(),
    }
    trainable = tune.with_resources(tune.with_parameters(_run_trial, ctx=ctx), _driver_resources(cluster))

    restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    print(f"[fssd] tune: {'resuming' if restoring else 'starting'} search {name} ({len(keys)} key(s): "
          f"{', '.join(keys)}); {tp.search} search, ASHA on {METRIC} over {tp.epochs} epoch(s); "
          f"{res['max_concurrent_trials']} concurrent trial(s) of {res['num_workers']} worker(s) x "
          f"{res['cpus_per_worker']:g} CPU(s); MLflow run {parent_id}{' (reopened)' if resumed else ''}", flush=True)
    if restoring:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False, storage_filesystem=storage_fs)
    else:
        space, pure_grid = param_space(entries, tp.search)
        search_alg, max_concurrent = _search_alg(params, res["max_concurrent_trials"])
        # max_t one past the last epoch: the same rungs below it, but ASHA does not stop a trial for
        # reaching max_t, so a trial that runs to the end returns on its own and Ray Train shuts
        # its workers down, instead of Tune killing the trial (and its Train controller).
        scheduler = ASHAScheduler(time_attr="epoch", max_t=tp.epochs + 1, grace_period=tp.scheduler.grace_period,
                                  reduction_factor=tp.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                num_samples=1 if pure_grid else tp.num_samples,
                max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[__getattr__("MlflowTrialLogger")(uri, params.mlflow.experiment, name, parent_id,
                                                            tp.epochs, keys),
                           *extra_callbacks],
            ),
        )
    c = tracking.client(uri)
    try:
        tuner.fit()
    except BaseException:
        c.set_terminated(parent_id, status="FAILED")
        raise
    finally:
        _ACTIVE.pop(name, None)

    analysis = tune.ExperimentAnalysis(experiment_path, storage_filesystem=storage_fs,
                                       default_metric=METRIC, default_mode=MODE)
    rows = _trial_rows(analysis, keys, tp.epochs, reader_fs)
    # Trials not yet generated when the search stopped are not in its state: count them too.
    unfinished = [r for r in rows if r["status"] not in (*_DONE, "EARLY_STOPPED")]
    missing = max(0, expected_trials(entries, tp.search, tp.num_samples) - len(rows))
    summary: dict[str, Any] = {"search": name, "mlflow_run_id": parent_id, "experiment_path": experiment_path,
                               "trials": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                               "interrupted": bool(unfinished or missing)}
    if unfinished or missing:
        c.set_terminated(parent_id, status="KILLED")
        print(f"[fssd] tune: search {name} interrupted with {len(unfinished) + missing} of {len(rows) + missing} "
              "trial(s) unfinished; "
              "run the tune stage again with the same params to resume it", flush=True)
        return summary

    best = _pick_best(rows)
    failed = [r for r in rows if r["status"] == "ERROR"]
    stopped = [r for r in rows if r["status"] == "EARLY_STOPPED"]
    metrics: dict[str, Any] = {
        "search": name,
        "mlflow_run_id": parent_id,
        "trials": summary["trials"],
        "num_trials": len(rows),
        "num_failed": len(failed),
        "num_early_stopped": len(stopped),
        "best": None,
        "seconds": round(time.time() - started, 1),
    }
    if best is None:
        atomic_write_json(Path(metrics_out), metrics)
        c.set_terminated(parent_id, status="FAILED")
        first = failed[0]["error"] if failed else "no trial reported a validation mAP"
        raise TuneSearchError(f"all {len(rows)} trial(s) of search {name} failed; first error: {first}")

    ckpt = best["_checkpoint"]
    checkpoint_out = Path(checkpoint_out)
    _copy_checkpoint(reader_fs, ckpt["path"], checkpoint_out)
    best_json = {
        "overrides": best["config"],
        "score": best["best_val_map"],
        "metric": METRIC,
        "trial_id": best["trial_id"],
        "checkpoint": str(checkpoint_out),
        "source_checkpoint": ckpt["path"],
        "best_epoch": ckpt["epoch"],
        "epochs": best["last_epoch"],
        "search": name,
        "mlflow_run_id": parent_id,
    }
    metrics["best"] = {k: best_json[k] for k in ("trial_id", "overrides", "score", "best_epoch", "epochs", "checkpoint")}
    metrics["seconds"] = round(time.time() - started, 1)
    atomic_write_json(Path(best_out), best_json)
    atomic_write_json(Path(metrics_out), metrics)

    try:
        tracking.log_params(uri, parent_id, {"best.trial_id": best["trial_id"],
                                             **{f"best.{k}": v for k, v in best["config"].items()}})
        tracking.log_metrics(uri, parent_id, {"best_val_map": best["best_val_map"], "num_trials": len(rows),
                                              "num_failed": len(failed), "num_early_stopped": len(stopped)},
                             step=0)
        c.set_tag(parent_id, "fssd.best_trial_id", best["trial_id"])
        c.set_tag(parent_id, "fssd.best_score", f"{best['best_val_map']:.6f}")
        with tempfile.TemporaryDirectory() as tmp:
            plot = plot_scores(rows, keys, Path(plot_out) if plot_out else Path(tmp) / "scores.png", best["trial_id"])
            c.log_artifact(parent_id, str(plot), artifact_path="tune")
        c.log_artifact(parent_id, str(best_out), artifact_path="tune")
        c.log_artifact(parent_id, str(metrics_out), artifact_path="tune")
    except Exception as e:  # noqa: BLE001
        _warn("logging the search result", e)
    c.set_terminated(parent_id, status="FINISHED")
    print(f"[fssd] tune: best trial {best['trial_id']} {METRIC} {best['best_val_map']:.4f} with {best['config']} "
          f"({len(stopped)} early-stopped, {len(failed)} failed of {len(rows)}) -> {best_out}", flush=True)
    summary["best"] = best_json
    return summary


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def handler(args: argparse.Namespace) -> int:
    overrides = parse_set(args.set or [])
    params = load_params(args.params, overrides)
    if not params.train.use_tuned:
        # The training will not use a search result: write an empty one instead of searching.
        from .io import atomic_write_json

        reason = "train.use_tuned is false"
        atomic_write_json(Path(args.best_out), {"overrides": {}, "skipped": reason})
        Path(args.checkpoint_out).unlink(missing_ok=True)
        if "://" not in params.tune.storage_path:  # a declared DVC output: it must exist
            Path(params.tune.storage_path).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.metrics_out), {"trials": [], "best": None, "skipped": reason, "seconds": 0.0})
        print(f"[fssd] tune: skipped ({reason})")
        return 0
    # a bad space (ParamsError) or a search without a usable trial (TuneSearchError) ends in
    # pipeline.cli.main's one-line message
    summary = run_search(args.params, overrides, best_out=Path(args.best_out),
                         checkpoint_out=Path(args.checkpoint_out), metrics_out=Path(args.metrics_out),
                         plot_out=Path(args.plot_out) if args.plot_out else None)
    if summary["interrupted"]:
        return 130
    print(json.dumps(summary["best"], indent=2))
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("tune", help="search tune.space with Ray Tune (ASHA), one Ray Train run per trial")
    add_params_args(p, "tune.num_samples=8")
    p.add_argument("--best-out", default="tune/best.json", help="the best trial's overrides and checkpoint")
    p.add_argument("--checkpoint-out", default="tune/best_checkpoint.pt", help="local copy of the best checkpoint")
    p.add_argument("--metrics-out", default="metrics/tune.json")
    p.add_argument("--plot-out", default=None, help="also write the score plot here (it is always an MLflow artifact)")
    p.set_defaults(func=handler)
