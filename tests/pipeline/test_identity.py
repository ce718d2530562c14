"""A run's name is a function of everything that changes its result: params, data, code and the
bytes of the files it starts from. The same inputs resume; anything else trains afresh."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import identity
from pipeline.params import load_params

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def code_copy(tmp_path, monkeypatch):
    """A copy of the code that identity hashes; the test edits it (never the real tree)."""
    root = tmp_path / "code"
    shutil.copytree(REPO / "fssd", root / "fssd", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pipeline").mkdir()
    for rel in (*identity.TRAINING_MODULES, "pipeline/tune.py"):
        shutil.copy(REPO / rel, root / rel)
    monkeypatch.setattr(identity, "_REPO", root)
    return root


def _touch_one_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\n")


def test_run_name_follows_code_data_and_file_bytes(tiny_data, tmp_path, make_params, code_copy):
    from pipeline.train import make_job
    from pipeline.tune import search_name

    weights = tmp_path / "vgg.pth"
    torch.save({"x": torch.zeros(2)}, weights)
    p = load_params(make_params(tmp_path / "params.yaml", tiny_data, tmp_path, **{"model.pretrained": str(weights)}))
    init = tmp_path / "init.pt"
    init.write_bytes(b"checkpoint one")

    def names() -> tuple[str, str, str]:
        return make_job(p).run_name, make_job(p, init_checkpoint=str(init)).run_name, search_name(p)

    first = names()
    assert names() == first  # the same inputs: the same names (re-running resumes)
    assert len(set(first)) == 3

    _touch_one_byte(code_copy / "fssd" / "loss.py")  # one byte of the library
    after_code = names()
    assert all(a != b for a, b in zip(after_code, first))

    _touch_one_byte(code_copy / "pipeline" / "tune.py")  # the search's own module: the search only
    after_tune = names()
    assert after_tune[:2] == after_code[:2] and after_tune[2] != after_code[2]

    torch.save({"x": torch.ones(2)}, weights)  # new bytes, same path
    after_weights = names()
    assert all(a != b for a, b in zip(after_weights, after_tune))

    init.write_bytes(b"checkpoint two")
    after_init = names()
    assert after_init[0] == after_weights[0] and after_init[1] != after_weights[1]


def test_validation_data_is_part_of_the_identity(tiny_data, tmp_path, make_params):
    from pipeline.train import make_job

    data = tmp_path / "data"
    shutil.copytree(tiny_data / "processed", data / "processed")
    p = load_params(make_params(tmp_path / "params.yaml", data, tmp_path))
    before = make_job(p).run_name
    val = json.loads((data / "processed" / "val.json").read_text())
    val["images"] = val["images"][:-1]
    (data / "processed" / "val.json").write_text(json.dumps(val))
    assert make_job(p).run_name != before


def test_relative_pretrained_path_is_made_absolute_and_checked(tiny_data, tmp_path, make_params, monkeypatch):
    import hashlib

    from pipeline.train import make_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "weights" / "vgg.pth")
    sha = hashlib.sha256((tmp_path / "weights" / "vgg.pth").read_bytes()).hexdigest()
    p = load_params(make_params(tmp_path / "params.yaml", tiny_data, tmp_path, **{"model.pretrained": "weights/vgg.pth"}))
    job = make_job(p)
    assert job.pretrained == str(tmp_path / "weights" / "vgg.pth") and job.pretrained_sha256 == sha
    wrong = load_params(make_params(tmp_path / "p2.yaml", tiny_data, tmp_path, **{
        "model.pretrained": "weights/vgg.pth", "model.pretrained_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="model.pretrained: .* has SHA-256"):
        make_job(wrong)
    missing = load_params(make_params(tmp_path / "p3.yaml", tiny_data, tmp_path, **{"model.pretrained": "nope.pth"}))
    with pytest.raises(FileNotFoundError, match="model.pretrained: .*nope.pth does not exist"):
        make_job(missing)


def test_select_best_needs_a_validation_split(tiny_data, tmp_path, make_params):
    from pipeline.train import make_job
    from pipeline.tune import require_validation_split
    from pipeline.params import ParamsError

    data = tmp_path / "data"
    shutil.copytree(tiny_data / "processed", data / "processed")
    val = json.loads((data / "processed" / "val.json").read_text())
    (data / "processed" / "val.json").write_text(json.dumps({**val, "images": [], "annotations": []}))
    p = load_params(make_params(tmp_path / "params.yaml", data, tmp_path))
    with pytest.raises(ValueError, match="train.select is 'best' but .*val.json has no images"):
        make_job(p)
    with pytest.raises(ParamsError, match="the search needs a validation split"):
        require_validation_split(p)
    last = load_params(make_params(tmp_path / "last.yaml", data, tmp_path, **{"train.select": "last"}))
    assert make_job(last).run_name.startswith("fssd-synthetic-fssd_lite-")


@pytest.mark.slow
def test_code_change_retrains_and_same_inputs_reuse(tiny_data, ray_session, tmp_path, make_params, code_copy):
    """Train 1 epoch; run again unchanged: the finished run is reused (nothing trains again);
    change one byte of the library: a new run trains every epoch. No test.json anywhere: the
    train stage never reads the test split."""
    import mlflow

    from pipeline.train import run_training

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "processed" / "test.json").unlink()
    p = load_params(make_params(tmp_path / "params.yaml", data, tmp_path, **{"train.epochs": 1, "train.use_tuned": False}))
    out = {"model_out": tmp_path / "models" / "fssd.pt", "metrics_out": tmp_path / "metrics" / "train.json"}
    first = run_training(p, **out)
    again = run_training(p, **out)
    assert again["run_name"] == first["run_name"] and again["epochs"] == 1
    client = mlflow.MlflowClient(p.mlflow.tracking_uri)
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "loss")] == [1]
    assert client.get_metric_history(again["mlflow_run_id"], "loss") == []  # the finished run: no epoch trained again

    _touch_one_byte(code_copy / "fssd" / "engine.py")
    changed = run_training(p, **out)
    assert changed["run_name"] != first["run_name"] and changed["mlflow_run_id"] != first["mlflow_run_id"]
    assert changed["epochs"] == 1
    assert [m.step for m in client.get_metric_history(changed["mlflow_run_id"], "loss")] == [1]


def _tiny_torchvision_vgg16(path: Path) -> None:
    """A torchvision-layout VGG16 state dict whose tensors are stride-0 views of one number per
    layer (a few KB on disk; the real file is 528 MB)."""
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    chans = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    sd = {}
    for k, idx in enumerate(convs):
        sd[f"features.{idx}.weight"] = torch.full((1,), 0.01 * (k + 1)).expand(chans[k + 1], chans[k], 3, 3)
        sd[f"features.{idx}.bias"] = torch.full((1,), 0.5).expand(chans[k + 1])
    sd["classifier.0.weight"] = torch.full((1,), 0.25).expand(4096, 512 * 7 * 7)
    sd["classifier.0.bias"] = torch.full((1,), 0.125).expand(4096)
    sd["classifier.3.weight"] = torch.full((1,), 0.375).expand(4096, 4096)
    sd["classifier.3.bias"] = torch.full((1,), 0.0625).expand(4096)
    torch.save(sd, path)


def test_pretrained_weights_from_s3_are_verified_and_loaded(moto_endpoint, fake_aws_env, tmp_path, monkeypatch):
    """model.pretrained: s3://... with model.pretrained_sha256 loads (fetched from a real S3
    endpoint, moto); a wrong checksum is refused, naming the URL."""
    import hashlib

    import boto3

    from fssd import build_fssd
    from pipeline.download import DownloadError
    from pipeline.train import _load_pretrained

    for k, v in fake_aws_env.items():
        monkeypatch.setenv(k, v)
    local = tmp_path / "vgg16.pth"
    _tiny_torchvision_vgg16(local)
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="weights")
    s3.upload_file(str(local), "weights", "imagenet/vgg16.pth")

    model = build_fssd("fssd300_vgg16", 3)
    _load_pretrained(model, "s3://weights/imagenet/vgg16.pth", sha, moto_endpoint)
    layers = model.backbone.layers
    assert torch.all(layers[0].weight == 0.01) and torch.all(layers[28].weight == 0.13)
    assert torch.all(layers[31].weight == 0.25) and torch.all(layers[33].bias == 0.0625)  # fc6, fc7
    with pytest.raises(DownloadError, match="checksum mismatch"):
        _load_pretrained(build_fssd("fssd300_vgg16", 3), "s3://weights/imagenet/vgg16.pth", "0" * 64, moto_endpoint)


def test_model_init_is_resolved_and_named_by_its_bytes(tiny_data, tmp_path, make_params):
    """model.init (a trained detector to fine-tune) travels as an absolute local file; its bytes
    and the class map are part of the run's identity."""
    from fssd import build_fssd
    from fssd.checkpoint import save_checkpoint
    from pipeline.train import make_job

    ckpt = tmp_path / "source.pt"
    model = build_fssd("fssd_lite", 4, input_size=96, fusion_channels=16)
    save_checkpoint(ckpt, model, model_config(model), ["a", "b", "c"])
    p = load_params(make_params(tmp_path / "params.yaml", tiny_data, tmp_path, **{"model.init": str(ckpt)}))
    job = make_job(p)
    assert job.model_init == str(ckpt.resolve()) and job.init_classes == {}
    mapped = load_params(make_params(tmp_path / "p2.yaml", tiny_data, tmp_path, **{
        "model.init": str(ckpt), "model.init_classes": {"circle": "a"}}))
    assert make_job(mapped).run_name != job.run_name
    save_checkpoint(ckpt, build_fssd("fssd_lite", 4, input_size=96, fusion_channels=16), model_config(model), ["a", "b", "c"])
    assert make_job(p).run_name != job.run_name


def model_config(model):
    from fssd.config import DetectorConfig

    return DetectorConfig(model=model.config, priors=model.prior_config)
