"""The evaluate stage on a tiny synthetic set: every output well formed, logged to the training run."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import pytest
import torch

from fssd import build_fssd, save_checkpoint
from fssd.config import DetectorConfig
from fssd.data.synthetic import CLASSES, generate_scenes
from pipeline import evaluate, tracking
from pipeline.convert import convert_dataset
from pipeline.params import load_params

REPO = Path(__file__).resolve().parents[2]
SIZE = 128


def _random_checkpoint(path: Path, class_names: list[str], seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = build_fssd("fssd_lite", len(class_names) + 1, input_size=SIZE)
    with torch.no_grad():
        for head, a in zip(model.conf_head, model.prior_config.anchors_per_location):
            head.weight.mul_(100.0)
            head.bias.view(a, len(class_names) + 1)[:, 1] += 1.0
    save_checkpoint(path, model, DetectorConfig(model=model.config, priors=model.prior_config), class_names)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A data root with a converted 12-image synthetic set, a random checkpoint and an MLflow store."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    generate_scenes(data / "raw" / "synthetic", 12, seed=3, split_fractions=(0.25, 0.25, 0.5),
                    min_size=96, max_size=160, workers=1)
    convert_dataset("synthetic", data / "raw", data / "processed", data, max_bad_fraction=0.0)
    _random_checkpoint(root / "fssd.pt", list(CLASSES))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the temp dir
        uri = f"sqlite:///{root}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield {"root": root, "data": data, "uri": uri}


def _params(project, **extra):
    overrides = {
        "data.root": str(project["data"]),
        "evaluate.batch_size": 4,
        "evaluate.num_draw": 2,
        "train.loader_workers": 0,
        "mlflow.experiment": "fssd-test",
        **extra,
    }
    return load_params(REPO / "params.yaml", overrides)


def test_evaluate_outputs_and_mlflow_training_run(project):
    root, uri = project["root"], project["uri"]
    run_id, _ = tracking.find_or_create_run(uri, "fssd-test", key="train-1", run_name="train-1",
                                            tags={"fssd.stage": "train"})
    tracking.client(uri).set_terminated(run_id, status="FINISHED")
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text(json.dumps({"mlflow_run_id": run_id}))

    out = root / "metrics" / "eval.json"
    metrics = evaluate.run_evaluate(
        _params(project), checkpoint=root / "fssd.pt", out_metrics=out, plots_dir=root / "plots",
        train_metrics=root / "metrics" / "train.json", device="cpu", speed_batch_sizes=(1, 2),
        speed_min_seconds=0.0,
    )

    # eval.json: what run_evaluate returned, every figure present and in range
    assert json.loads(out.read_text()) == metrics
    n_test = len(json.loads((project["data"] / "processed" / "test.json").read_text())["images"])
    assert metrics["num_test_images"] == n_test > 0
    for key in ("map_voc07", "map_area"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["coco"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(-1.0 <= v <= 1.0 for v in metrics["coco"].values())
    assert set(metrics["per_class_ap"]) == set(CLASSES)
    speed = metrics["speed"]
    assert speed["batch1_latency_ms"] > 0 and speed["throughput_img_s"] > 0
    assert speed["best_batch_size"] in (1, 2) and set(speed["throughput_by_batch_size"]) == {"1", "2"}
    assert isinstance(metrics["device"], str) and metrics["device"]
    assert metrics["seconds"] > 0 and metrics["mlflow_run_id"] == run_id

    # per-class table: a header and one row per class
    md = (root / "metrics" / "eval_per_class.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| class")]
    assert [r.split("|")[1].strip() for r in rows] == list(CLASSES)

    # PR curves: one CSV for a single DVC plot definition, <= 200 points per class, values in [0, 1]
    with open(root / "plots" / "pr_curves.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table and set(table[0]) == {"class", "recall", "precision"}
    per_class: dict[str, int] = {}
    for r in table:
        assert r["class"] in CLASSES
        assert 0.0 <= float(r["recall"]) <= 1.0 and 0.0 <= float(r["precision"]) <= 1.0
        per_class[r["class"]] = per_class.get(r["class"], 0) + 1
    assert max(per_class.values()) <= 200
    assert (root / "plots" / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = sorted((root / "plots" / "detections").glob("*.jpg"))
    assert len(drawn) == 2 and all(cv2.imread(str(p)) is not None for p in drawn)
    assert not list(root.glob("**/*.tmp-*"))

    # MLflow: test_ metrics and the files under evaluation/ on the training run
    c = tracking.client(uri)
    run = c.get_run(run_id)
    assert run.data.metrics["test_map_voc07"] == pytest.approx(metrics["map_voc07"])
    for key in ("test_map_area", "test_coco_AP", "test_latency_ms_batch1", "test_throughput_img_s",
                f"test_ap_{CLASSES[0]}"):
        assert key in run.data.metrics
    arts = {a.path for a in c.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/eval.json", "evaluation/eval_per_class.md", "evaluation/pr_curves.csv",
            "evaluation/pr_curves.png", "evaluation/detections"} <= arts
    assert len(c.list_artifacts(run_id, "evaluation/detections")) == 2
    assert run.info.status == "FINISHED"


def test_cli_without_a_training_run_creates_an_evaluate_run(project, capsys):
    root, uri = project["root"], project["uri"]
    parser = argparse.ArgumentParser(prog="fssd")
    evaluate.add_cli(parser.add_subparsers(dest="command", required=True))
    out = root / "cli" / "eval.json"
    args = parser.parse_args([
        "evaluate", "--params", str(REPO / "params.yaml"),
        "--set", f"data.root={project['data']}", "--set", "evaluate.num_draw=1", "--set", "train.loader_workers=0",
        "--set", "mlflow.experiment=fssd-test",
        "--checkpoint", str(root / "fssd.pt"), "--metrics-out", str(out), "--plots-dir", str(root / "cli" / "plots"),
        "--train-metrics", str(root / "missing-train.json"), "--device", "cpu",
        "--speed-batch-sizes", "1", "--speed-seconds", "0",
    ])
    assert args.func(args) == 0
    assert "test mAP VOC07" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert (root / "cli" / "eval_per_class.md").is_file()
    assert len(list((root / "cli" / "plots" / "detections").glob("*.jpg"))) == 1
    run = tracking.client(uri).get_run(metrics["mlflow_run_id"])
    assert run.data.tags["fssd.stage"] == "evaluate" and run.info.status == "FINISHED"
    assert "test_map_voc07" in run.data.metrics

    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--speed-batch-sizes", "0,x"])


def test_checkpoint_of_other_classes_is_refused(project, tmp_path):
    _random_checkpoint(tmp_path / "other.pt", ["a", "b"])
    with pytest.raises(ValueError, match="trained on classes"):
        evaluate.run_evaluate(_params(project), checkpoint=tmp_path / "other.pt", out_metrics=tmp_path / "e.json",
                              plots_dir=tmp_path / "plots", log_mlflow=False, device="cpu")
    assert not (tmp_path / "e.json").exists()
