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
    moved, why = register.decide_alias(0.9, "2", None)  # a champion set by hand, without a mAP tag
    assert not moved and "no test_map_voc07 tag" in why
