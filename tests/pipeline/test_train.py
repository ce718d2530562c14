"""Ray Train on CPU (gloo): DDP equivalence, fault tolerance and resume, MLflow logging."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.params import load_params

pytestmark = pytest.mark.slow


def _final_weights(result):
    from fssd.checkpoint import load_checkpoint

    with result.checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / "checkpoint.pt")["model"]


def test_two_workers_match_one_worker_with_double_batch(tiny_data, ray_session, tmp_path, make_params):
    """2 workers x batch 4 reach the parameters of 1 worker x batch 8 (same samples, BN frozen)."""
    from pipeline.train import fit, make_job

    weights = {}
    for workers in (1, 2):
        p = make_params(tmp_path / f"params{workers}.yaml", tiny_data, tmp_path,
                         **{"train.epochs": 1, "train.num_workers": workers, "train.freeze_bn": True,
                            "train.cpus_per_worker": 1, "train.grad_clip": None})
        params = load_params(p)
        job = make_job(params, run_name=f"ddp-{workers}")
        weights[workers] = _final_weights(fit(job, params.train, storage_path=str(tmp_path / "ray")))
    one, two = weights[1], weights[2]
    assert one.keys() == two.keys()
    moved = 0
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"parameter {k} differs")
    # and training really changed the weights (4 steps of SGD)
    from fssd.models.presets import build_detector
    from fssd.config import DetectorConfig

    job_cfg = DetectorConfig.from_dict(make_job(load_params(tmp_path / "params1.yaml"), run_name="x").detector)
    torch.manual_seed(0)
    init = build_detector(job_cfg).state_dict()
    moved = sum(not torch.allclose(init[k], one[k]) for k in one if one[k].is_floating_point())
    assert moved > 10


def test_worker_killed_resumes_without_duplicate_mlflow_steps(tiny_data, ray_session, tmp_path, monkeypatch, make_params):
    """A worker SIGKILLs itself once in epoch 2; max_failures=1 restarts from the epoch-1 checkpoint."""
    import mlflow

    from pipeline.cli import main
    from pipeline.tracking import files_sha256

    monkeypatch.chdir(tmp_path)
    # the stage runs in a git checkout: the MLflow run is tagged with its commit
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "init"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path,
                     **{"train.epochs": 3, "train.max_failures": 1, "train.use_tuned": False})
    marker = tmp_path / "killed"
    rc = main(["train", "--params", str(p), "--test-kill-at-epoch", "1", "--test-kill-marker", str(marker)])
    assert rc == 0
    assert marker.exists(), "the kill hook did not fire"
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["epochs"] == 3
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(metrics["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("git.commit") == head
    assert run.data.tags.get("data.sha256") == files_sha256(sorted((tiny_data / "processed").glob("*.json")))
    assert any(a.path == "checkpoint" for a in client.list_artifacts(run.info.run_id))


def test_interrupted_train_continues_at_next_epoch(tiny_data, tmp_path, make_params):
    """SIGINT after epoch 1 of 3; the re-run resumes at epoch 2 instead of starting over."""
    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path,
                     **{"train.epochs": 3, "train.use_tuned": False, "train.log_every": 2})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--params", str(p)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def drain() -> None:  # keep reading, so that a full pipe never blocks the run
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    storage = tmp_path / "ray_results" / "train"

    def latest_persisted() -> str | None:
        """The checkpoint a re-run resumes from: the latest one in Ray Train's checkpoint-manager
        snapshot (written after the checkpoint directory is in storage), if it is readable yet."""
        for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            except (OSError, ValueError):  # not there yet, or being written
                continue
            name = latest.get("checkpoint_dir_name")
            if name and (snapshot.parent / name / "checkpoint.pt").is_file():
                return name
        return None

    try:
        deadline = time.monotonic() + 400
        while (latest := latest_persisted()) is None:
            assert proc.poll() is None, "training exited before persisting epoch 1:\n" + "".join(lines[-40:])
            assert time.monotonic() < deadline, "epoch 1 was not persisted in 400 s:\n" + "".join(lines[-40:])
            time.sleep(0.2)
        assert latest == "checkpoint_epoch0001", f"first persisted checkpoint is {latest}"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    assert not (tmp_path / "metrics" / "train.json").exists(), "the first run should have been interrupted"
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "resumed" in log and "from epoch 2/3" in log, log[-3000:]
    assert "[fssd] epoch 1/3" not in log
    assert "[fssd] epoch 2/3 step 2/4" in log  # train.log_every progress lines (no terminal here)
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["epochs"] == 3

