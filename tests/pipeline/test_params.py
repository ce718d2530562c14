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
        ("train.augment.zoom_out=0.5", r"train.augment.zoom_out must be >= 1"),
        ("train.augment.flip=2", "train.augment.flip must be a probability"),
        ("train.augment.crop=maybe", "train.augment.crop must be"),
        ("data.synthetic.objects_per_image=[3, 1]", r"data.synthetic.objects_per_image must satisfy 1 <= min <= max <= 127, got \[3, 1\]"),
        ("data.synthetic.object_size_range=[0.5]", "data.synthetic.object_size_range must have 2 values"),
        ("data.synthetic.max_occlusion=1", r"data.synthetic.max_occlusion must be in \[0, 1\)"),
        ("data.val_fraction=1", r"data.val_fraction must be in \[0, 1\)"),
        ("data.val_max_images=0", "data.val_max_images must be >= 1 or null"),
        ("train.select=first", "train.select must be 'best'"),
        ("train.difficult=skip", "train.difficult must be one of target, ignore, drop"),
        ("model.pretrained=s3://b/vgg.pth", "model.pretrained is remote .* needs model.pretrained_sha256"),
        ("model.pretrained_sha256=abc", "model.pretrained_sha256 must be 64 hex digits"),
        ("data.format=yolo", "data.format must be 'voc'"),
        ("data.test_fraction=0.96", "data.test_fraction must be in"),
        ("data.classes=[a, a]", "data.classes must be distinct"),
        ("data.layout.anotations=x", "unknown key data.layout.anotations"),
        ("model.pretrained=https://x/vgg.pth", "model.pretrained must be a local path or s3://"),
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


def test_augment_params_choose_the_training_transform():
    import numpy as np
    import torch

    from fssd.data.transforms import eval_transform
    from pipeline.params import AugmentParams
    from pipeline.train import augmentation

    mean, std = (123.0, 117.0, 104.0), (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    boxes, labels = np.array([[0.1, 0.2, 0.5, 0.7], [0.6, 0.1, 0.9, 0.4]]), [1, 2]
    off = augmentation(AugmentParams(photometric=False, zoom_out=1.0, crop=False, flip=0.0), 64, mean, std)
    ref = eval_transform(64, mean, std)(image=image, bboxes=boxes, labels=labels)
    for _ in range(3):  # with everything off the training transform is the evaluation transform
        out = off(image=image, bboxes=boxes, labels=labels)
        assert torch.equal(out["image"], ref["image"])
        np.testing.assert_allclose(np.asarray(out["bboxes"]), np.asarray(ref["bboxes"]), atol=1e-6)
    flipped = augmentation(AugmentParams(photometric=False, zoom_out=1.0, crop=False, flip=1.0), 64, mean, std)
    out = flipped(image=image, bboxes=boxes, labels=labels)
    assert torch.equal(out["image"], ref["image"].flip(-1))
    names = [type(t).__name__ for t in augmentation(AugmentParams(), 64, mean, std).transforms]
    assert "ZoomOut" in names and "MinIoURandomCrop" in names  # the defaults are SSD's


def test_synthetic_params_defaults_are_the_generators():
    import inspect

    from fssd.data.synthetic import generate_scenes
    from pipeline.params import SyntheticParams

    sig = inspect.signature(generate_scenes).parameters
    assert SyntheticParams().scene_kwargs() == {k: sig[k].default for k in SyntheticParams().scene_kwargs()}
    shipped = load_params(REPO / "params.yaml").data.synthetic
    assert shipped == SyntheticParams()  # params.yaml shows the generator's defaults
