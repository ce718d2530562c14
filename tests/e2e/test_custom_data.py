"""Your own data through `dvc repro`: a 3-class VOC-XML export with class names outside VOC's and
no image-set files, then a COCO-JSON export whose category ids are 3, 17 and 90, each packed as
an archive and configured in params.yaml alone. The trained model, the evaluation, the registered
MLflow model and `fssd detect` use the dataset's own names (and ids)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

MICRO = {
    "model.input_size": 96,
    "model.fusion_channels": 16,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.loader_workers": 0,
    "train.use_tuned": False,  # the search has its own e2e test; here the data path matters
    "evaluate.num_draw": 1,
    "data.val_fraction": 0.2,
    "data.test_fraction": 0.2,
}


def _run(cmd, cwd, env, timeout=1200):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def _pack(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    work = tmp_path_factory.mktemp("custom")
    clone = work / "fssd"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "clone", "-q", str(REPO), str(clone)], work, env)
    return {"dir": clone, "env": env, "work": work}


def _repro(clone, overrides):
    from pipeline.params import apply_overrides

    d = clone["dir"]
    raw = yaml.safe_load((d / "params.yaml").read_text())
    (d / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, {**MICRO, **overrides}), sort_keys=False))
    return _run([BIN / "dvc", "repro"], d, clone["env"])


def _detect(clone, model, image):
    out = subprocess.run([BIN / "fssd", "detect", str(image), "--model", model, "--score-threshold", "0.0"],
                         cwd=clone["dir"], env=clone["env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["images"]


def _check_run(clone, model_name, classes):
    import mlflow

    from fssd.checkpoint import load_checkpoint

    d = clone["dir"]
    report = json.loads((d / "data" / "processed" / "report.json").read_text())
    assert report["classes"] == classes
    ckpt = load_checkpoint(d / "models" / "fssd.pt")
    assert ckpt["class_names"] == classes
    ev = json.loads((d / "metrics" / "eval.json").read_text())
    assert sorted(ev["per_class_ap"]) == sorted(classes)
    c = mlflow.MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    versions = c.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1 and versions[0].tags.get("fssd.classes") == ",".join(classes)
    return report, ckpt


def test_voc_export_with_its_own_classes(clone, exports):
    export = exports.voc(clone["work"] / "voc export")
    archive = _pack(export, clone["work"] / "voc_export.tar.gz")
    log = _repro(clone, {"data.dataset": "custom", "data.format": "voc",
                         "data.sources": [{"url": archive.as_uri(), "extract": True}],
                         "register.model_name": "fssd-fruit"})
    assert "classes found in the training annotations" in log
    report, ckpt = _check_run(clone, "fssd-fruit", ["apple", "pear", "plum"])
    assert report["held_out"]["test"] and report["held_out"]["val"]
    image = next((clone["dir"] / "data" / "raw").rglob("img 002.jpg"))
    [entry] = _detect(clone, "models:/fssd-fruit@champion", image)
    assert entry["detections"] and {det["name"] for det in entry["detections"]} <= {"apple", "pear", "plum"}


def test_coco_export_keeps_its_category_ids(clone, exports):
    export = exports.coco(clone["work"] / "coco export")
    archive = _pack(export, clone["work"] / "coco_export.tar.gz")
    log = _repro(clone, {"data.dataset": "custom", "data.format": "coco",
                         "data.sources": [{"url": archive.as_uri(), "extract": True}],
                         "data.layout.root": "coco export",  # data/raw also holds the first test's export
                         # fine-tuned from the fruit model registered by the test before (no class in common)
                         "model.init": "models:/fssd-fruit@champion",
                         "register.model_name": "fssd-hardware"})
    assert "re-initialised: bolt, nut, washer" in log and "dropped: apple, pear, plum" in log, log[-3000:]
    report, ckpt = _check_run(clone, "fssd-hardware", ["bolt", "nut", "washer"])
    assert report["category_ids"] == [3, 17, 90] and ckpt["meta"]["category_ids"] == [3, 17, 90]
    image = next((clone["dir"] / "data" / "raw").rglob("photo 03.jpg"))
    [entry] = _detect(clone, "models/fssd.pt", image)
    pairs = {(det["name"], det["category_id"]) for det in entry["detections"]}
    assert pairs and pairs <= {("bolt", 3), ("nut", 17), ("washer", 90)}
