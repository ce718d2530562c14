"""End to end: `dvc repro` of the whole pipeline in a temporary git clone, on a micro profile;
then the outputs, metrics, MLflow store and champion alias; a second `dvc repro` is a no-op;
`dvc metrics show` / `dvc plots show`; and `mlflow server` over the store, queried by REST."""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

MICRO = {
    "data.synthetic.num_images": 60,
    "model.input_size": 96,
    "model.fusion_channels": 16,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.loader_workers": 0,
    "train.val_every": 1,
    "tune.num_samples": 2,
    "tune.epochs": 1,
    "tune.space": {"model.fusion_channels": {"choice": [8, 16]}, "priors.min_scale": {"uniform": [0.15, 0.25]}},
    "evaluate.num_draw": 2,
}


def _run(cmd, cwd, env, timeout=1200):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git clone of the committed project with the micro profile in params.yaml, after `dvc repro`."""
    from pipeline.params import apply_overrides

    work = tmp_path_factory.mktemp("e2e")
    clone = work / "fssd"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "clone", "-q", str(REPO), str(clone)], work, env)
    raw = yaml.safe_load((clone / "params.yaml").read_text())
    (clone / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, MICRO), sort_keys=False))
    started = time.time()
    log = _run([BIN / "dvc", "repro"], clone, env, timeout=1800)
    return {"dir": clone, "env": env, "log": log, "seconds": time.time() - started}


def test_every_stage_ran_and_wrote_its_outputs(project):
    d = project["dir"]
    for name in ("download", "convert", "tune", "train", "eval", "register"):  # every stage's seconds
        metrics = json.loads((d / "metrics" / f"{name}.json").read_text())
        assert metrics["seconds"] >= 0, name
    for split in ("train", "val", "test"):
        assert json.loads((d / "data" / "processed" / f"{split}.json").read_text())["images"]
    best = json.loads((d / "tune" / "best.json").read_text())
    assert set(best["overrides"]) == {"model.fusion_channels", "priors.min_scale"}
    assert len(json.loads((d / "metrics" / "tune.json").read_text())["trials"]) == 2
    from fssd.checkpoint import load_checkpoint

    ckpt = load_checkpoint(d / "models" / "fssd.pt")
    assert ckpt["config"].model.fusion_channels == best["overrides"]["model.fusion_channels"]  # tuned values used
    ev = json.loads((d / "metrics" / "eval.json").read_text())
    assert 0.0 <= ev["map_voc07"] <= 1.0 and "AP" in ev["coco"]
    assert (d / "plots" / "pr_curves.csv").is_file() and (d / "plots" / "pr_curves.png").is_file()
    reg = json.loads((d / "metrics" / "register.json").read_text())
    assert reg["version"] == "1" or reg["version"] == 1


def test_mlflow_store_has_runs_and_champion(project):
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{project['dir'] / 'mlflow.db'}")
    mv = c.get_model_version_by_alias("fssd-synthetic", "champion")
    assert str(mv.version) == "1"
    exp = c.get_experiment_by_name("fssd")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    train_id = json.loads((project["dir"] / "metrics" / "train.json").read_text())["mlflow_run_id"]
    train = c.get_run(train_id)
    assert "test_map_voc07" in train.data.metrics and "val_map" in train.data.metrics


def test_second_repro_is_a_no_op(project):
    started = time.time()
    log = _run([BIN / "dvc", "repro"], project["dir"], project["env"])
    assert "Data and pipelines are up to date" in log or all(
        f"Stage '{s}' didn't change, skipping" in log for s in ("download", "convert", "tune", "train", "evaluate", "register")
    ), log[-3000:]
    assert time.time() - started < 120


def test_dvc_metrics_and_plots_show(project):
    out = _run([BIN / "dvc", "metrics", "show", "--json"], project["dir"], project["env"])
    assert "map_voc07" in out
    html = project["dir"] / "plots_out"
    _run([BIN / "dvc", "plots", "show", "-o", str(html)], project["dir"], project["env"])
    assert (html / "index.html").is_file()


def test_mlflow_server_rest_api(project, mlflow_server):
    d = project["dir"]
    with mlflow_server(f"sqlite:///{d / 'mlflow.db'}", d / "mlartifacts", d, project["env"]) as base:

        def get(path, **query):
            with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
                return json.loads(r.read())

        exp = get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="fssd")["experiment"]
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = json.loads(r.read())["runs"]
        names = {run["info"].get("run_name", "") for run in runs}
        assert any(n.startswith("fssd-synthetic-fssd_lite") for n in names), names
        train = next(r for r in runs if any(m["key"] == "test_map_voc07" for m in r["data"].get("metrics", [])))
        assert any(m["key"] == "val_map" for m in train["data"]["metrics"])
        alias = get("/api/2.0/mlflow/registered-models/alias", name="fssd-synthetic", alias="champion")
        assert str(alias["model_version"]["version"]) == "1"



def test_dvc_remote_on_s3_push_and_pull(project, moto_endpoint, fake_aws_env, tmp_path):
    """The README's DVC-on-S3 recipe against moto: `dvc remote add`, `endpointurl`, `dvc push`;
    a second clone of the committed state then `dvc pull`s the same data, search result and model."""
    import boto3

    d, env = project["dir"], {**project["env"], **fake_aws_env}
    bucket = "fssd-dvc"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)
    _run([BIN / "dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/fssd-dvc"], d, env)
    _run([BIN / "dvc", "remote", "modify", "storage", "endpointurl", moto_endpoint], d, env)
    _run([BIN / "dvc", "push"], d, env)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="fssd-dvc/")
    assert listed.get("KeyCount", 0) > 0

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    _run([*git, "add", "dvc.lock", "params.yaml", ".dvc/config"], d, env)
    _run([*git, "commit", "-q", "-m", "micro run"], d, env)
    other = tmp_path / "other"
    _run(["git", "clone", "-q", str(d), str(other)], tmp_path, env)
    _run([BIN / "dvc", "pull"], other, env)
    for rel in ("data/processed/train.json", "data/processed/test.json", "tune/best.json", "models/fssd.pt"):
        assert (other / rel).read_bytes() == (d / rel).read_bytes(), rel


def test_repro_with_the_search_off(project):
    """The README's way to skip the search (train.use_tuned: false) runs through `dvc repro`:
    the skipped tune stage still leaves its declared outputs, and training starts afresh."""
    d = project["dir"]
    raw = yaml.safe_load((d / "params.yaml").read_text())
    from pipeline.params import apply_overrides

    (d / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, {"train.use_tuned": False, "train.epochs": 1}),
                                                  sort_keys=False))
    log = _run([BIN / "dvc", "repro"], d, project["env"])
    assert "tune: skipped (train.use_tuned is false)" in log, log[-3000:]
    assert json.loads((d / "tune" / "best.json").read_text())["overrides"] == {}
    train = json.loads((d / "metrics" / "train.json").read_text())
    assert train["epochs"] == 1
    assert json.loads((d / "metrics" / "register.json").read_text())["version"] in ("2", 2)
