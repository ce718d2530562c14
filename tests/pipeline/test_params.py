from pathlib import Path

import pytest

from pipeline.params import ParamsError, apply_overrides, detector_config, load_params, parse_set

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + [REPO / "params.yaml"], ids=lambda p: p.name)
def test_shipped_params_files_validate(path):
    params = load_params(path)
    cfg = detector_config(params, num_classes=21)
    assert cfg.model.num_classes == 21


def test_set_overrides_are_typed_and_checked():
    p = load_params(REPO / "params.yaml", parse_set(["train.epochs=3", "model.preset=fssd300_vgg16", "train.milestones=[1, 2]"]))
    assert p.train.epochs == 3 and p.model.preset == "fssd300_vgg16" and p.train.milestones == (1, 2)
    assert p.train.scaled_lr == pytest.approx(p.train.lr * p.train.batch_size / p.train.lr_reference_batch)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.epocs=3", "unknown key train.epocs"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("model.preset=ssd", "model.preset must be one of"),
        ("priors.min_scale=0.99", r"min_scale \(0.99\) must be smaller"),
        ("train.num_workers=5", "divisible by train.num_workers"),
        ("data.dataset=imagenet", "data.dataset must be one of"),
        ("train.sync_bn=true", "train.sync_bn needs train.use_gpu"),
        ("train.lr.x=1", "train.lr is not a mapping"),
        ("notakey", "--set expects key=value"),
    ],
)
def test_bad_params_name_the_key(item, message):
    with pytest.raises(ParamsError, match=message):
        load_params(REPO / "params.yaml", parse_set([item]))


def test_search_space_keys_are_free_form():
    raw = apply_overrides({"tune": {"space": {}}}, {"tune.space.train.lr": {"loguniform": [1e-3, 1e-1]}})
    assert raw["tune"]["space"] == {"train.lr": {"loguniform": [1e-3, 1e-1]}}


def test_missing_params_file_names_it(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml does not exist"):
        load_params(tmp_path / "nope.yaml")
