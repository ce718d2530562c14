"""The tune stage: space validation (no Ray), and one real ASHA search over Ray Train runs that is
interrupted after two trials and resumed, then consumed by the train stage.

The Ray part is one search shared by the slow tests (each TorchTrainer fit costs ~40-70 s of
actor start-up here). Its space is a 2 x 2 grid, data.root x model.fusion_channels:

  (good root, 24)    +0.5 score offset (test hook): runs all 3 epochs, the best; always trial 1
  (good root, 32)    val_map ~0 at epoch 1 < the rung's cutoff 0.5: ASHA stops it
  (missing root, 24) fails inside the trial (make_job: no processed data); the search goes on
  (missing root, 32) always the last trial; fails the same way

The search is interrupted (SIGUSR1, Tune's graceful stop, as on Ctrl+C) after three trials have
finished, whichever key Tune's grid varies fastest, and run again: only the fourth runs then.
Interrupting after three keeps the ASHA comparison inside one run: Ray Tune does not save the
scheduler's rungs with the experiment, so a resumed search's ASHA only compares new results.

A few CPU steps on a tiny set score val_map ~0 for every configuration, so the offset hook
(``FSSD_TUNE_TEST_SCORE_OFFSETS``) gives ASHA a clearly better trial; one trial at a time (one
2-CPU worker on a 2-CPU Ray) keeps the order, hence ASHA's decisions, deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from ray.tune import Callback

from pipeline.params import ParamsError, load_params


# --------------------------------------------------------------------------------------------
# Space validation: fast, no Ray
# --------------------------------------------------------------------------------------------

BAD_SPACES = [
    ("model.fusion_chanels", {"choice": [32, 64]}, "unknown key model.fusion_chanels"),
    ("model.fusion_channels", {"choice": []}, "non-empty list"),
    ("model.fusion_channels", {"choice": [64, "big"]}, "'big'"),
    ("model.fusion_channels", {"grid": [64, 0]}, "value 0"),
    ("priors.min_scale", {"uniform": [0.3, 0.1]}, "min 0.3 > max 0.1"),
    ("train.lr", {"loguniform": [0.1, 0.01]}, "min 0.1 > max 0.01"),
    ("train.lr", {"loguniform": [0.0, 0.01]}, "bounds > 0"),
    ("seed", {"randint": [5, 1]}, "min 5 > max 1"),
    ("seed", {"randint": [0.5, 3]}, "integer bounds"),
    ("model.fusion_channels", {"uniform": [16, 64]}, "uniform value 16.0"),  # sampled floats for an int key
    ("priors.min_scale", {"normal": [0.1, 0.3]}, "unknown distribution kind 'normal'"),
    ("priors.min_scale", [0.1, 0.2], "must be a mapping with one distribution"),
    ("priors.min_scale", {"uniform": [0.1]}, "[low, high]"),
    ("train.val_every", {"choice": [1, 2]}, "sets this key itself"),
    ("tune.epochs", {"choice": [1, 2]}, "tune stage's own settings"),
    ("train.batch_size", {"choice": [8, "x"]}, "'x'"),
]


@pytest.mark.parametrize("key,spec,message", BAD_SPACES, ids=[f"{k}-{m[:18]}" for k, _, m in BAD_SPACES])
def test_invalid_space_is_rejected_before_any_trial(tiny_data, tmp_path, monkeypatch, key, spec, message, make_params):
    from pipeline import tune

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid space")

    monkeypatch.setattr(tune, "init_ray", no_ray)
    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path, {"model.fusion_channels": {"choice": [16, 32]}, key: spec})
    with pytest.raises(ParamsError) as e:
        tune.run_search(p, best_out=tmp_path / "best.json", metrics_out=tmp_path / "tune.json")
    assert f"tune.space.{key}" in str(e.value) and message in str(e.value), str(e.value)
    assert not (tmp_path / "best.json").exists()


def test_cli_rejects_a_bad_space_from_set_naming_the_key(tiny_data, tmp_path, capsys, make_params):
    from pipeline.cli import main

    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path)
    rc = main(["tune", "--params", str(p), "--set", "tune.space.model.fusion_channels={choice: [64, big]}",
               "--best-out", str(tmp_path / "best.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "tune.space.model.fusion_channels" in err and "'big'" in err
    assert not (tmp_path / "best.json").exists()


def test_search_grid_needs_finite_values_and_optuna_no_grid(tiny_data, tmp_path, make_params):
    from pipeline.tune import validate_space

    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path)  # the default space: a choice and two uniforms
    with pytest.raises(ParamsError, match=r"tune.space.priors.min_scale: tune.search is 'grid'"):
        validate_space(p, {"tune.search": "grid"})
    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path, {"model.fusion_channels": {"grid": [16, 32]}})
    with pytest.raises(ParamsError, match=r"optuna.*model.fusion_channels"):
        validate_space(p, {"tune.search": "optuna"})
    with pytest.raises(ParamsError, match="tune.space is empty"):
        validate_space(make_params(tmp_path / "params.yaml", tiny_data, tmp_path, {}))


def test_optuna_missing_says_how_to_install(tiny_data, tmp_path, monkeypatch, make_params):
    import builtins

    from pipeline import tune

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(tune, "init_ray", lambda *a, **k: pytest.fail("Ray started without optuna"))
    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path)
    with pytest.raises(ParamsError, match="uv add optuna"):
        tune.run_search(p, {"tune.search": "optuna"})


def test_space_builds_tune_domains(tiny_data, tmp_path, make_params):
    from ray import tune as rt

    from pipeline.tune import expected_trials, param_space, validate_space

    space = {
        "model.fusion_channels": {"choice": [16, 32]},
        "priors.min_scale": {"uniform": [0.1, 0.3]},
        "train.lr": {"loguniform": [0.001, 0.1]},
        "seed": {"randint": [3, 3]},
        "train.batch_size": {"grid_search": [8, 16]},
    }
    params, entries = validate_space(make_params(tmp_path / "params.yaml", tiny_data, tmp_path, space))
    assert [e.key for e in entries] == list(space)
    built, pure_grid = param_space(entries, "random")
    assert not pure_grid
    assert isinstance(built["model.fusion_channels"], rt.search.sample.Categorical)
    assert isinstance(built["priors.min_scale"], rt.search.sample.Float)
    assert built["seed"].sample() == 3  # randint bounds are inclusive
    assert built["train.batch_size"] == {"grid_search": [8, 16]}
    built, pure_grid = param_space(entries[:1], "grid")
    assert pure_grid and built["model.fusion_channels"] == {"grid_search": [16, 32]}
    assert expected_trials(entries, "random", 4) == 2 * 4  # the grid, once per sample
    assert expected_trials(entries[:1], "grid", 4) == 2
    assert expected_trials(entries[:2], "random", 4) == 4


def test_search_name_is_deterministic_and_tracks_the_space(tiny_data, tmp_path, make_params):
    from pipeline.tune import search_name

    p = make_params(tmp_path / "params.yaml", tiny_data, tmp_path)
    a, b = search_name(load_params(p)), search_name(load_params(p, {"tune.storage_path": "elsewhere"}))
    assert a == b and a.startswith("tune-synthetic-fssd_lite-")
    assert search_name(load_params(p, {"tune.space.train.lr": {"loguniform": [0.01, 0.1]}})) != a
    assert search_name(load_params(p, {"tune.num_samples": 9})) != a


def test_trial_resources_fit_the_cluster(tiny_data, tmp_path, make_params):
    from pipeline.tune import _driver_resources, trial_resources

    params = load_params(make_params(tmp_path / "params.yaml", tiny_data, tmp_path))
    r = trial_resources(params, {"CPU": 2.0})
    assert (r["num_workers"], r["cpus_per_worker"], r["max_concurrent_trials"]) == (1, 2.0, 1)
    r = trial_resources(load_params(tmp_path / "params.yaml", {"tune.cpus_per_worker": 1}), {"CPU": 2.0})
    assert r["max_concurrent_trials"] == 2
    r = trial_resources(load_params(tmp_path / "params.yaml", {"tune.num_workers": 2, "tune.cpus_per_worker": 2}),
                        {"CPU": 3.0})
    assert r["max_concurrent_trials"] == 1  # at least one, even when a trial does not fit
    r = trial_resources(load_params(tmp_path / "params.yaml", {"train.use_gpu": True}), {"CPU": 64.0, "GPU": 2.0})
    assert (r["cpus_per_worker"], r["max_concurrent_trials"]) == (4.0, 2)
    assert _driver_resources({"CPU": 2.0, "node:__internal_head__": 1.0})["CPU"] == 0
    assert _driver_resources({"CPU": 2.0}) == {"CPU": 0, "memory": 1}


def test_score_plot_is_a_png(tmp_path):
    from pipeline.tune import plot_scores

    rows = [
        {"trial_id": "a", "status": "TERMINATED", "config": {"k": 16, "s": "x"}, "best_val_map": 0.5},
        {"trial_id": "b", "status": "EARLY_STOPPED", "config": {"k": 32, "s": "y"}, "best_val_map": 0.1},
        {"trial_id": "c", "status": "ERROR", "config": {"k": 64, "s": "y"}, "best_val_map": None},
    ]
    out = plot_scores(rows, ["k", "s"], tmp_path / "p.png", best_trial="a")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# One real search, interrupted and resumed (slow)
# --------------------------------------------------------------------------------------------


class InterruptAfter(Callback):
    """Test-only Tune callback: after ``n`` trials have finished, send this process SIGUSR1, on which
    Tune stops the search gracefully and saves its state (what Ctrl+C does), once (marker file).
    It also records every trial start, so the test can tell whether a finished trial ran again.
    (A restored Tuner brings back the callbacks it was started with: hence the marker.)"""

    def __init__(self, n: int, marker: Path, starts: Path) -> None:
        self.n, self.marker, self.starts, self.done = n, str(marker), str(starts), 0

    def on_trial_start(self, iteration, trials, trial, **info):
        with open(self.starts, "a") as f:
            f.write(trial.trial_id + "\n")

    def _finished(self):
        self.done += 1
        if self.done >= self.n and not os.path.exists(self.marker):
            handler = signal.getsignal(signal.SIGUSR1)
            assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), "Tune's SIGUSR1 handler is not installed"
            Path(self.marker).write_text("interrupted")
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished()


@pytest.fixture(scope="module")
def tune_ray(ray_session):
    """The session's Ray (pipeline.train.init_ray tells actors the dashboard address, so Ray
    Train's placement-group cleaner frees the CPUs of trials that ASHA stops)."""
    from pipeline import tune

    assert tune.dashboard_env_set()
    return ray_session


@pytest.fixture(scope="module")
def search(tiny_data, tune_ray, tmp_path_factory, make_params):
    """Run the 2 x 2 grid search, interrupted after three trials, then resumed to the end."""
    from pipeline.tune import TEST_SCORE_OFFSETS_ENV, run_search

    tmp = tmp_path_factory.mktemp("tune")
    data = tmp / "data"  # without test.json: the search and the training after it never read the test split
    shutil.copytree(tiny_data, data)
    (data / "processed" / "test.json").unlink()
    missing = tmp / "no-such-data"
    space = {"data.root": {"grid": [str(data), str(missing)]}, "model.fusion_channels": {"grid": [24, 32]}}
    p = make_params(tmp / "params.yaml", data, tmp, space, **{
        "tune.epochs": 3, "tune.scheduler.grace_period": 1, "tune.scheduler.reduction_factor": 2,
        "train.max_failures": 0, "train.use_tuned": True,
    })
    out = {"best_out": tmp / "tune" / "best.json", "checkpoint_out": tmp / "tune" / "best_checkpoint.pt",
           "metrics_out": tmp / "metrics" / "tune.json", "plot_out": tmp / "tune" / "scores.png"}
    starts = tmp / "starts.txt"
    old = os.environ.get(TEST_SCORE_OFFSETS_ENV)
    os.environ[TEST_SCORE_OFFSETS_ENV] = json.dumps({"model.fusion_channels=24": 0.5})
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        first = run_search(p, **out, extra_callbacks=[InterruptAfter(3, tmp / "interrupted", starts)])
        first_starts = starts.read_text().split()
        assert not out["best_out"].exists()
        second = run_search(p, **out)
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop(TEST_SCORE_OFFSETS_ENV, None)
        else:
            os.environ[TEST_SCORE_OFFSETS_ENV] = old
    return {"params": p, "tmp": tmp, "first": first, "second": second, "first_starts": first_starts,
            "starts": starts.read_text().split(), **out}


@pytest.mark.slow
def test_asha_stops_the_weak_trial_and_failures_do_not_stop_the_search(search):
    first, second = search["first"], search["second"]
    assert first["interrupted"] and not second["interrupted"]
    assert first["search"] == second["search"]
    metrics = json.loads(search["metrics_out"].read_text())
    rows = metrics["trials"]
    assert len(rows) == 4
    by = {(r["config"]["data.root"].endswith("no-such-data"), r["config"]["model.fusion_channels"]): r for r in rows}
    good24, good32, bad24, bad32 = by[(False, 24)], by[(False, 32)], by[(True, 24)], by[(True, 32)]
    assert good24["status"] == "TERMINATED" and good24["last_epoch"] == 3
    assert 0.5 <= good24["best_val_map"] < 1.0  # offset 0.5 + a tiny real mAP
    assert good32["status"] == "EARLY_STOPPED" and good32["last_epoch"] == 1, good32
    for r in (bad24, bad32):
        assert r["status"] == "ERROR" and r["best_val_map"] is None
        assert "does not exist" in r["error"], r["error"]
    assert metrics["num_failed"] == 2 and metrics["num_early_stopped"] == 1
    best = json.loads(search["best_out"].read_text())
    assert best["trial_id"] == good24["trial_id"] == metrics["best"]["trial_id"]
    assert best["overrides"] == {"data.root": good24["config"]["data.root"], "model.fusion_channels": 24}
    assert best["score"] == good24["best_val_map"]
    assert Path(best["checkpoint"]) == search["checkpoint_out"] and search["checkpoint_out"].is_file()
    assert best["source_checkpoint"].endswith("checkpoint.pt")
    assert search["plot_out"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resumed_search_does_not_rerun_finished_trials(search):
    starts = search["starts"]
    before = {r["trial_id"]: r["status"] for r in search["first"]["trials"]}
    done_before = [t for t, status in before.items() if status in ("TERMINATED", "EARLY_STOPPED", "ERROR")]
    # one trial at a time: the interruption came after three trials, the last one had not run
    assert sorted(before[t] for t in done_before) == ["EARLY_STOPPED", "ERROR", "TERMINATED"], before
    assert set(search["first_starts"]) <= set(before)
    for t in done_before:
        assert starts.count(t) == 1, (t, starts)  # started once over both runs: not rerun
    rows = json.loads(search["metrics_out"].read_text())["trials"]
    assert set(starts) == {r["trial_id"] for r in rows}  # the fourth ran after the restart


@pytest.mark.slow
def test_mlflow_has_one_parent_with_a_child_per_trial(search):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{search['tmp'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fssd")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`fssd.stage` = 'tune'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id == search["second"]["mlflow_run_id"] == search["first"]["mlflow_run_id"]
    best = json.loads(search["best_out"].read_text())
    assert parent.data.tags["fssd.best_trial_id"] == best["trial_id"]
    assert parent.data.params["best.model.fusion_channels"] == "24"
    assert parent.data.metrics["best_val_map"] == pytest.approx(best["score"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/scores.png", "tune/best.json", "tune/tune.json"} <= artifacts
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    status = {c.data.tags["fssd.trial_id"]: c for c in children}
    assert set(status) == {r["trial_id"] for r in json.loads(search["metrics_out"].read_text())["trials"]}
    for c in children:
        expected = {"TERMINATED": "FINISHED", "EARLY_STOPPED": "FINISHED", "ERROR": "FAILED"}[c.data.tags["fssd.trial_status"]]
        assert c.info.status == expected
        assert c.data.params["model.fusion_channels"] in ("24", "32")
    winner = status[best["trial_id"]]
    history = client.get_metric_history(winner.info.run_id, "val_map")
    assert sorted(m.step for m in history) == [1, 2, 3]  # per epoch, logged once each


@pytest.mark.slow
def test_train_stage_uses_the_tuned_values(search, tune_ray):
    import torch

    from pipeline.cli import main

    tmp = search["tmp"]
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        rc = main(["train", "--params", str(search["params"]), "--set", "train.epochs=1",
                   "--tuned", str(search["best_out"]), "--model-out", str(tmp / "models" / "fssd.pt"),
                   "--metrics-out", str(tmp / "metrics" / "train.json")])
    finally:
        os.chdir(cwd)
    assert rc == 0
    base = load_params(search["params"]).model.fusion_channels
    assert base == 16  # params.yaml says 16; the search picked 24
    payload = torch.load(tmp / "models" / "fssd.pt", map_location="cpu", weights_only=False)
    assert payload["config"]["model"]["fusion_channels"] == 24
