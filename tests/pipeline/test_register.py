"""The register stage on a real MLflow SQLite store: champion alias rules, pyfunc round trip,
`fssd detect` on registry URIs. One store for the module (creating it is the slow part)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from fssd import build_fssd, save_checkpoint
from fssd.config import DetectorConfig
from fssd.predictor import Predictor, decode_image
from pipeline import detect, register, tracking
from pipeline.params import load_params

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle"]
NAME = "fssd-test"


def _random_checkpoint(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_fssd("fssd_lite", len(CLASSES) + 1, input_size=128)
    with torch.no_grad():
        for head, a in zip(model.conf_head, model.prior_config.anchors_per_location):
            head.weight.mul_(100.0)
            head.bias.view(a, len(CLASSES) + 1)[:, 1 + seed % len(CLASSES)] += 1.0
    # a training-state blob, as the train stage writes: the registered copy must leave it out
    save_checkpoint(path, model, DetectorConfig(model=model.config, priors=model.prior_config), CLASSES,
                    training={"epoch": 3, "optimizer": {"blob": torch.zeros(1000)}})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("register")
    (root / "data" / "processed").mkdir(parents=True)
    (root / "data" / "processed" / "test.json").write_text('{"images":[],"annotations":[],"categories":[]}\n')
    for i in range(1, 5):
        _random_checkpoint(root / f"fssd{i}.pt", seed=i)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the temp dir
        uri = f"sqlite:///{root}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        params = load_params(REPO / "params.yaml", {
            "data.root": str(root / "data"), "register.model_name": NAME, "mlflow.experiment": "fssd-test",
        })
        run_id, _ = tracking.find_or_create_run(uri, "fssd-test", key="train", run_name="train",
                                                tags={"fssd.stage": "train"})
        tracking.client(uri).set_terminated(run_id, status="FINISHED")
        (root / "train.json").write_text(json.dumps({"mlflow_run_id": run_id}))
        yield {"root": root, "uri": uri, "params": params, "train_run": run_id}


def _register(store, i: int, eval_metrics) -> dict:
    root = store["root"]
    out = root / f"register{i}.json"
    summary = register.run_register(store["params"], checkpoint=root / f"fssd{i}.pt", eval_metrics=eval_metrics,
                                    out=out, train_metrics=root / "train.json")
    assert json.loads(out.read_text()) == summary
    return summary


def test_champion_moves_only_on_a_strictly_better_map(store):
    c = tracking.client(store["uri"])
    first = _register(store, 1, {"map_voc07": 0.5, "map_area": 0.52, "coco": {"AP": 0.3}, "per_class_ap": {"circle": 0.5}})
    assert first["version"] == 1 and first["alias_moved"] and first["previous_champion_version"] is None
    assert first["champion_version"] == 1 and first["mlflow_run_id"] == store["train_run"]

    worse = _register(store, 2, {"map_voc07": 0.4})
    assert worse["version"] == 2 and not worse["alias_moved"]
    assert (worse["champion_version"], worse["previous_champion_version"], worse["previous_champion_map_voc07"]) == (1, 1, 0.5)
    assert "below" in worse["reason"]

    eval_json = store["root"] / "eval3.json"  # eval metrics read from a file, as the stage does
    eval_json.write_text(json.dumps({"map_voc07": 0.5, "mlflow_run_id": store["train_run"]}))
    tie = _register(store, 3, eval_json)
    assert tie["version"] == 3 and not tie["alias_moved"] and tie["champion_version"] == 1 and "ties" in tie["reason"]
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"

    better = _register(store, 4, {"map_voc07": 0.7, "map_area": 0.71})
    assert better["version"] == 4 and better["alias_moved"]
    assert (better["champion_version"], better["previous_champion_version"], better["previous_champion_map_voc07"]) == (4, 1, 0.5)
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "4"

    # version tags: eval metrics, data hash, git commit, the training run
    tags = c.get_model_version(NAME, "1").tags
    assert float(tags["test_map_voc07"]) == 0.5 and float(tags["test_coco_AP"]) == 0.3
    assert float(tags["test_ap_circle"]) == 0.5
    assert tags["data.sha256"] and tags["git.commit"] and tags["fssd.run_id"] == store["train_run"]
    assert c.get_model_version(NAME, "1").run_id == store["train_run"]  # lineage, as log_model's registration had
    assert float(c.get_model_version(NAME, "4").tags["test_map_voc07"]) == 0.7
    # the model is logged under the training run, as a LoggedModel with the checkpoint artifact
    logged = c.get_logged_model(better["model_id"])
    assert logged.source_run_id == store["train_run"]


def test_champion_round_trip_and_detect_on_registry_uris(store, tmp_path, capsys):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    rng = np.random.default_rng(1)
    encoded = []
    for h, w in ((100, 150), (180, 120)):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        cv2.rectangle(img, (10, 10), (w // 2, h // 2), (0, 0, 255), -1)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        encoded.append(buf.tobytes())
    images = [decode_image(e) for e in encoded]
    expected = Predictor.from_checkpoint(store["root"] / "fssd4.pt", device="cpu").predict(images)

    frame = model.predict(pd.DataFrame({"image": encoded}))
    assert list(frame.columns) == list(register.OUTPUT_COLUMNS)
    for i, det in enumerate(expected):
        rows = frame[frame["image_index"] == i]
        assert len(rows) == len(det["scores"]) > 0
        np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(), det["boxes"], atol=1e-3)
        np.testing.assert_allclose(rows["score"].to_numpy(), det["scores"], atol=1e-6)
        assert rows["label"].tolist() == det["labels"].tolist() and rows["name"].tolist() == det["names"]
    t = float(frame["score"].median())
    strict = model.predict(pd.DataFrame({"image": encoded}), params={"score_threshold": t})
    assert 0 < len(strict) < len(frame) and (strict["score"] > t).all()
    # the wrapped model also takes a list of RGB arrays
    direct = model.unwrap_python_model().predict(None, images)
    np.testing.assert_allclose(direct[["x1", "y1", "x2", "y2"]].to_numpy(), frame[["x1", "y1", "x2", "y2"]].to_numpy(), atol=1e-3)
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"image": [b"garbage"]}))

    # fssd detect on the registry URI runs the champion's checkpoint
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    parser = argparse.ArgumentParser(prog="fssd")
    detect.add_cli(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(["detect", *argv])
        return args.func(args)

    assert run(*paths, "--model", f"models:/{NAME}@champion", "--score-threshold", "0.01") == 0
    doc = json.loads(capsys.readouterr().out)
    for entry, det in zip(doc["images"], expected):
        assert [d["name"] for d in entry["detections"]] == det["names"]
        np.testing.assert_allclose([d["box"] for d in entry["detections"]], det["boxes"], atol=0.01)
    assert run(paths[0], "--model", f"models:/{NAME}/2") == 0
    capsys.readouterr()

    for bad in (f"models:/{NAME}@no-such-alias", "models:/no-such-model/1"):
        assert run(paths[0], "--model", bad) == 2
        err = capsys.readouterr().err
        assert bad in err and "MLflow registry" in err


def test_bad_checkpoint_fails_before_touching_mlflow(store, tmp_path):
    from fssd.checkpoint import CheckpointError

    c = tracking.client(store["uri"])
    exp = c.get_experiment_by_name("fssd-test").experiment_id
    runs_before = len(c.search_runs([exp]))
    versions_before = len(c.search_model_versions(f"name='{NAME}'"))
    with pytest.raises(CheckpointError, match="missing.pt"):
        register.run_register(store["params"], checkpoint=tmp_path / "missing.pt", eval_metrics={"map_voc07": 0.9},
                              out=tmp_path / "r.json", train_metrics=None)
    assert len(c.search_runs([exp])) == runs_before
    assert len(c.search_model_versions(f"name='{NAME}'")) == versions_before
    assert not (tmp_path / "r.json").exists()
    assert c.get_run(store["train_run"]).info.status == "FINISHED"


def test_tracking_uri_from_params_leaves_mlflow_globals_alone(store, monkeypatch):
    import os

    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params = load_params(REPO / "params.yaml", {
        "data.root": str(store["root"] / "data"), "register.model_name": NAME, "mlflow.experiment": "fssd-test",
        "mlflow.tracking_uri": store["uri"],
    })
    before = tracking_utils._tracking_uri
    summary = register.run_register(params, checkpoint=store["root"] / "fssd1.pt", eval_metrics={"map_voc07": 0.1},
                                    out=store["root"] / "register5.json", train_metrics=store["root"] / "train.json")
    assert summary["version"] == 5 and not summary["alias_moved"] and summary["champion_version"] == 4
    assert tracking_utils._tracking_uri == before and "MLFLOW_TRACKING_URI" not in os.environ
    assert str(tracking.client(store["uri"]).get_model_version_by_alias(NAME, "champion").version) == "4"


def test_decide_alias_rules():
    assert register.decide_alias(0.3, None, None)[0] is True
    assert register.decide_alias(0.6, "2", 0.5)[0] is True
    assert register.decide_alias(0.5, "2", 0.5)[0] is False
    assert register.decide_alias(0.4, "2", 0.5)[0] is False
    assert register.decide_alias(None, "2", 0.5)[0] is False
    for no_map in (None, float("nan"), float("inf"), "nan"):  # never champion, not even the first
        moved, why = register.decide_alias(no_map, None, None)
        assert not moved and "never becomes champion" in why
    moved, why = register.decide_alias(0.9, "2", None, champion_pinned=True)  # set by hand, without a mAP tag
    assert not moved and "no test_map_voc07 tag" in why
    assert register.decide_alias(0.1, "2", float("nan"))[0] is True  # a champion without a finite mAP gives way


def test_best_version_and_standing():
    best = register.best_version
    assert best({}) is None and best({"1": None, "2": float("nan"), "3": float("inf")}) is None
    assert best({"1": 0.5, "2": 0.7, "3": None}) == "2"
    assert best({"1": 0.5, "2": 0.7, "3": 0.7}) == "2"  # a tie: the earliest best ...
    assert best({"1": 0.5, "2": 0.7, "3": 0.7}, current="3") == "3"  # ... unless the champion is among them
    assert best({"1": 0.5, "2": 0.7}, current="1") == "2" and best({"9": 0.1, "10": 0.1}) == "9"
    stand = register.version_standing
    assert stand({"test_map_voc07": "0.5"}) == (True, 0.5) and stand({"test_map_voc07": "nan"}) == (True, None)
    assert stand({"fssd.run_id": "abc"}) == (True, None)  # registered by the stage without a mAP (older release)
    assert stand({"note": "by hand"}) == (False, None) and stand(None) == (False, None)


def _version(client, name: str, run_id: str, map_tag: str | None, **tags: str) -> str:
    """A cheap model version (no model files: the alias decision reads tags only)."""
    if map_tag is not None:
        tags["test_map_voc07"] = map_tag
    return str(client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version)


def _cheap_run(client) -> str:
    exp = client.get_experiment_by_name("cheap-versions")
    return client.create_run(exp.experiment_id if exp else client.create_experiment("cheap-versions")).info.run_id


def test_no_finite_map_never_becomes_champion(store):
    """Empty registry + a version without a finite mAP: no alias; a finite one takes it later."""
    from mlflow.exceptions import MlflowException

    c = tracking.client(store["uri"])
    c.create_registered_model("m")
    run = _cheap_run(c)
    for i, no_map in enumerate(("nan", "None", None)):
        v = _version(c, "m", run, no_map, **{"fssd.run_id": "r"})
        got = register.claim_alias(c, "m", "champion", v)
        assert got["champion_version"] is None and got["writes"] == [], (i, got)
        with pytest.raises(MlflowException):
            c.get_model_version_by_alias("m", "champion")
    v4 = _version(c, "m", run, "0.25")
    got = register.claim_alias(c, "m", "champion", v4)
    assert (got["champion_version"], got["champion_map_voc07"], got["writes"]) == ("4", 0.25, ["4"])
    assert register.claim_alias(c, "m", "champion", _version(c, "m", run, "0.25"))["champion_version"] == "4"  # tie
    assert register.claim_alias(c, "m", "champion", _version(c, "m", run, "nan"))["champion_version"] == "4"
    assert register.claim_alias(c, "m", "champion", _version(c, "m", run, "0.3"))["champion_version"] == "7"

    # a champion left behind by an older release (registered without a mAP) gives way to any mAP;
    # one set by hand (no mAP tag, not registered by the stage) is left alone
    c.create_registered_model("old")
    c.set_registered_model_alias("old", "champion", _version(c, "old", run, None, **{"fssd.run_id": "r"}))
    assert register.claim_alias(c, "old", "champion", _version(c, "old", run, "0.01"))["champion_version"] == "2"
    c.create_registered_model("hand")
    c.set_registered_model_alias("hand", "champion", _version(c, "hand", run, None))
    got = register.claim_alias(c, "hand", "champion", _version(c, "hand", run, "0.9"))
    assert got["pinned"] and got["champion_version"] == "1" and got["writes"] == []


def test_a_stale_write_is_corrected(store):
    """The race the re-check is for: P reads the registry, then Q creates a better version and
    claims the alias, then P's write (decided on its stale read) lands. P must put Q's back."""
    c = tracking.client(store["uri"])
    c.create_registered_model("stale")
    run = _cheap_run(c)
    p_version = _version(c, "stale", run, "0.4")

    class LateWriter:  # P's client: Q runs in full between P's read and P's first write
        def __init__(self):
            self.q = None

        def __getattr__(self, attr):
            return getattr(c, attr)

        def set_registered_model_alias(self, name, alias, version):
            if self.q is None:
                self.q = register.claim_alias(c, name, alias, _version(c, name, run, "0.6"))
            c.set_registered_model_alias(name, alias, version)

    p_client = LateWriter()
    got = register.claim_alias(p_client, "stale", "champion", p_version)
    assert p_client.q["writes"] == ["2"] and p_client.q["champion_version"] == "2"
    assert got["writes"] == ["1", "2"] and got["champion_version"] == "2" and got["rounds"] == 3
    assert str(c.get_model_version_by_alias("stale", "champion").version) == "2"


def test_register_without_a_map_takes_no_alias(store):
    """The stage itself: the version gets test_map_voc07=nan and no alias, and a later one takes it."""
    c = tracking.client(store["uri"])
    params = load_params(REPO / "params.yaml", {
        "data.root": str(store["root"] / "data"), "register.model_name": "fssd-nan", "mlflow.experiment": "fssd-test",
    })
    root = store["root"]
    first = register.run_register(params, checkpoint=root / "fssd1.pt", eval_metrics={"map_voc07": float("nan")},
                                  out=root / "nan1.json", train_metrics=root / "train.json")
    assert first["version"] == 1 and not first["alias_moved"] and first["champion_version"] is None
    assert "never becomes champion" in first["reason"]
    assert c.get_model_version("fssd-nan", "1").tags["test_map_voc07"] == "nan"
    assert "champion" not in (c.get_registered_model("fssd-nan").aliases or {})
    second = register.run_register(params, checkpoint=root / "fssd2.pt", eval_metrics={"map_voc07": 0.01},
                                   out=root / "nan2.json", train_metrics=root / "train.json")
    assert second["version"] == 2 and second["alias_moved"] and second["champion_version"] == 2
    assert second["alias_writes"] == [2]
    assert str(c.get_model_version_by_alias("fssd-nan", "champion").version) == "2"


# Two registrations at once against one `mlflow server`, as two stage processes would do it: each
# child creates a version with its mAP tag in the create call (as run_register does) and then runs
# claim_alias. The parent releases both children together (a barrier): in even rounds just before
# the alias decision (both versions exist), in odd rounds just before the version is created (so
# one child may decide before the other's version exists: the case the re-check is for).
_RACER = r"""
import json, sys
from pipeline import register, tracking

client = tracking.client(sys.stdin.readline().strip())  # the server's URL: imports overlap its start
version = None
for line in sys.stdin:
    cmd = json.loads(line)
    if "map" in cmd:
        version = str(client.create_model_version(
            cmd["name"], f"runs:/{cmd['run']}/model", run_id=cmd["run"],
            tags={"test_map_voc07": cmd["map"], "fssd.run_id": cmd["run"]}).version)
    out = {"version": version}
    if cmd["claim"]:
        out.update(register.claim_alias(client, cmd["name"], "champion", version))
    print(json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_two_registrations_at_once_end_with_the_better_champion(tmp_path, mlflow_server):
    import os
    import subprocess
    import sys
    import time

    rounds = 20
    started = time.monotonic()
    # no MLflow telemetry (its thread sets an environment variable while requests iterates
    # os.environ) and no server job runner (8 more processes importing mlflow: the server starts
    # minutes later on a busy 2-core machine)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    racers = [subprocess.Popen([sys.executable, "-c", _RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=tmp_path, env=env) for _ in range(2)]

    def together(cmds: list) -> list[dict]:
        for p, cmd in zip(racers, cmds):  # both commands go out before either answer is read
            p.stdin.write((cmd if isinstance(cmd, str) else json.dumps(cmd)) + "\n")
            p.stdin.flush()
        return [json.loads(p.stdout.readline()) for p in racers] if not isinstance(cmds[0], str) else []

    try:
        with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "mlartifacts", tmp_path, env) as base:
            server_up = time.monotonic()
            together([base, base])
            c = tracking.client(base)
            run = _cheap_run(c)
            plan = []
            for r in range(rounds):
                name = f"race-{r}"
                c.create_registered_model(name)
                maps = ("0.6", "0.4") if r % 2 else ("0.4", "0.6")  # either racer holds the better model
                old = None
                if r % 4 >= 2:  # half the rounds start with a champion that both racers beat (0.3) or one (0.5)
                    old = _version(c, name, run, "0.3" if r % 4 == 2 else "0.5", **{"fssd.run_id": "old"})
                    c.set_registered_model_alias(name, "champion", old)
                plan.append((r, name, maps, old))

            writes = corrected = 0
            set_up = time.monotonic()
            for r, name, maps, old in plan:
                create = [{"name": name, "run": run, "map": m} for m in maps]
                if r % 2 == 0:  # barrier just before the alias decision
                    together([{**cmd, "claim": False} for cmd in create])
                    results = together([{"name": name, "claim": True} for _ in maps])
                else:  # barrier just before the version is created
                    results = together([{**cmd, "claim": True} for cmd in create])
                better = results[maps.index("0.6")]["version"]
                champion = str(c.get_model_version_by_alias(name, "champion").version)
                assert champion == better, (r, maps, old, results)
                assert all(res["champion_version"] == better for res in results), (r, results)
                writes += sum(len(res["writes"]) for res in results)
                corrected += sum(res["rounds"] > 2 for res in results)
    finally:
        for p in racers:
            p.stdin.close()
        for p in racers:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"{rounds} rounds: {writes} alias writes, {corrected} claims corrected the alias after a write; "
          f"server up in {server_up - started:.0f} s, set up {set_up - server_up:.0f} s, "
          f"rounds {time.monotonic() - set_up:.0f} s")
