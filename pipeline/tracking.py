"""MLflow helpers: one writer, flattened params, resumable runs, provenance tags.

SQLite allows one writer: runs are created and written by one process (the driver, or the
Ray Train controller through :class:`MlflowEpochLogger`), never by every worker.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = [
    "resolve_tracking_uri",
    "client",
    "experiment_id",
    "find_or_create_run",
    "log_params",
    "log_metrics",
    "git_commit",
    "dvc_data_hash",
    "provenance_tags",
]


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative ``sqlite:///file.db`` becomes absolute (Ray actors
    run in other directories)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (root or Path.cwd()) / uri[len(prefix) :]
        return prefix + str(path.resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri).resolve().as_uri()
    return uri


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - created concurrently
        return c.get_experiment_by_name(name).experiment_id


def find_or_create_run(
    tracking_uri: str,
    experiment: str,
    *,
    key: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """The unfinished run tagged ``fssd.run_key = key`` (resumed), else a new one.

    Returns (run_id, resumed). A finished run with the same key is not reused.
    """
    c = client(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment)
    found = c.search_runs(
        [exp_id],
        filter_string=f"tags.`fssd.run_key` = '{key}' and attributes.status != 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    all_tags = {"fssd.run_key": key, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, False


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log flattened params (values as strings, at most 6000 chars), 100 per batch; a param
    already logged with the same value is skipped, so a resumed run does not fail."""
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    items = []
    for k, v in params.items():
        s = str(v)[:6000]
        if k in existing:
            continue
        items.append(Param(k, s))
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client(tracking_uri).log_batch(run_id, metrics=items[i : i + 1000])


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dvc_data_hash(processed_dir: Path, root: Path | None = None) -> str | None:
    """The md5 DVC recorded in dvc.lock for the processed-data output, if DVC ran the convert stage."""
    lock = (root or Path.cwd()) / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return None
    target = os.path.normpath(str(processed_dir))
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if os.path.normpath(str(out.get("path", ""))) == target:
                return out.get("md5")
    return None


def files_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def provenance_tags(processed_dir: Path) -> dict[str, str]:
    tags = {}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
    dvc_hash = dvc_data_hash(processed_dir)
    if dvc_hash:
        tags["dvc.data_md5"] = dvc_hash
    jsons = sorted(processed_dir.glob("*.json"))
    if jsons:
        tags["data.sha256"] = files_sha256(jsons)
    return tags
