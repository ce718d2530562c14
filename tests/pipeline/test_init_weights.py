"""`model.init`: a checkpoint path, s3:// (moto) or models:/NAME@ALIAS (a real MLflow SQLite store
with a model registered by the register stage) resolved to a local checkpoint, then fine-tuned
into other classes with fssd.weights.transfer_detector."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fssd import build_fssd, load_checkpoint, save_checkpoint
from fssd.config import DetectorConfig
from fssd.weights import transfer_detector
from pipeline.init_weights import resolve_init

REPO = Path(__file__).resolve().parents[2]
SOURCE_CLASSES = ["a", "b", "c"]


def _checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_fssd("fssd_lite", len(SOURCE_CLASSES) + 1, input_size=64, fusion_channels=8)
    save_checkpoint(path, model, DetectorConfig(model=model.config, priors=model.prior_config), SOURCE_CLASSES,
                    training={"epoch": 1, "optimizer": {"blob": torch.zeros(10)}})
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resolve(uri: str, tmp_path: Path, **kw) -> Path:
    kw.setdefault("tracking_uri", f"sqlite:///{tmp_path}/mlflow.db")
    kw.setdefault("s3_endpoint_url", None)
    return resolve_init(uri, workdir=tmp_path / "init", **kw)


def test_local_path_made_absolute_and_errors(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "models" / "coco.pt")
    monkeypatch.chdir(tmp_path)
    path = _resolve("models/coco.pt", tmp_path)
    assert path.is_absolute() and path == ckpt.resolve()
    assert load_checkpoint(path)["class_names"] == SOURCE_CLASSES
    assert _resolve(ckpt.resolve().as_uri(), tmp_path) == ckpt.resolve()  # file://
    assert _resolve("models/coco.pt", tmp_path, sha256=_sha256(ckpt)) == ckpt.resolve()
    assert not (tmp_path / "init").exists()  # nothing downloaded, nothing copied

    with pytest.raises(FileNotFoundError, match=r"model\.init 'models/nope\.pt'.*does not exist"):
        _resolve("models/nope.pt", tmp_path)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        _resolve("models", tmp_path)
    with pytest.raises(ValueError, match=r"has sha256 .* model\.init_sha256 is 0+"):
        _resolve("models/coco.pt", tmp_path, sha256="0" * 64)
    with pytest.raises(ValueError, match=r"set model\.init_sha256"):
        _resolve("s3://bucket/models/coco.pt", tmp_path)
    with pytest.raises(ValueError, match=r"models:/NAME@ALIAS"):
        _resolve("models:/fssd-coco2017", tmp_path)
    with pytest.raises(ValueError, match="unsupported scheme"):
        _resolve("gs://bucket/coco.pt", tmp_path)
    # a registry URI without a store: no empty mlflow.db is created
    with pytest.raises(FileNotFoundError, match="no MLflow store"):
        _resolve("models:/fssd-coco2017@champion", tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


def test_s3_fetched_and_verified(moto_endpoint, tmp_path, monkeypatch):
    import boto3

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(var, value)
    ckpt = _checkpoint(tmp_path / "coco.pt")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="fssd-init")
    s3.put_object(Bucket="fssd-init", Key="models/coco.pt", Body=ckpt.read_bytes())

    path = _resolve("s3://fssd-init/models/coco.pt", tmp_path, s3_endpoint_url=moto_endpoint, sha256=_sha256(ckpt))
    assert path == (tmp_path / "init" / "coco.pt").resolve() and path.read_bytes() == ckpt.read_bytes()
    assert load_checkpoint(path)["class_names"] == SOURCE_CLASSES


def test_registry_alias_and_version_fine_tuned_into_other_classes(tmp_path, monkeypatch):
    from pipeline import register
    from pipeline.params import load_params

    (tmp_path / "data" / "processed").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "test.json").write_text('{"images":[],"annotations":[],"categories":[]}\n')
    ckpt = _checkpoint(tmp_path / "fssd.pt", seed=3)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in the temp dir
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params(REPO / "params.yaml", {
        "data.root": str(tmp_path / "data"), "register.model_name": "fssd-src", "mlflow.experiment": "fssd-init",
    })
    summary = register.run_register(params, checkpoint=ckpt, eval_metrics={"map_voc07": 0.5},
                                     out=tmp_path / "register.json", train_metrics=None)
    assert summary["version"] == 1 and summary["alias_moved"]

    path = _resolve("models:/fssd-src@champion", tmp_path, tracking_uri=uri)
    assert path == tmp_path / "init" / "fssd-src-v1.pt"
    assert [p.name for p in (tmp_path / "init").iterdir()] == ["fssd-src-v1.pt"]  # no temp files left
    payload = load_checkpoint(path)
    assert payload["class_names"] == SOURCE_CLASSES and payload["training"] is None  # the slim copy
    assert _resolve("models:/fssd-src/1", tmp_path, tracking_uri=uri, sha256=_sha256(path)) == path

    # fine-tune into {b, c, d}: b and c keep their trained rows
    torch.manual_seed(0)
    target = build_fssd("fssd_lite", 4, input_size=64, fusion_channels=8)
    report = transfer_detector(payload["model"], payload["class_names"], target, ["b", "c", "d"])
    assert (report.copied, report.new, report.dropped) == (("b", "c"), ("d",), ("a",))
    src = payload["model"]["conf_head.0.bias"].reshape(-1, 4)
    torch.testing.assert_close(target.conf_head[0].bias.detach().reshape(-1, 4)[:, :3], src[:, [0, 2, 3]])

    with pytest.raises(ValueError, match=r"no alias 'nope' of model 'fssd-src'.*register the source model"):
        _resolve("models:/fssd-src@nope", tmp_path, tracking_uri=uri)
    with pytest.raises(ValueError, match=r"no version 7 of model 'fssd-src'"):
        _resolve("models:/fssd-src/7", tmp_path, tracking_uri=uri)
    with pytest.raises(ValueError, match=r"model 'fssd-other'"):
        _resolve("models:/fssd-other@champion", tmp_path, tracking_uri=uri)
