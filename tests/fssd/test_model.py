import subprocess
import sys

import pytest
import torch

from fssd import build_fssd, preset_config
from fssd.config import ConfigError, DetectorConfig


def test_import_fssd_loads_no_framework():
    code = (
        "import sys, fssd, fssd.models, fssd.weights, fssd.checkpoint\n"
        "import importlib.util\n"
        "for opt in ('fssd.data', 'fssd.evaluation'):\n"
        "    if importlib.util.find_spec(opt): __import__(opt)\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'dvc', 'boto3', 'botocore', 'yaml'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import fssd loaded {out.stdout.strip()}"


@pytest.mark.parametrize("size", [256, 300, 320])
def test_lite_any_input_size(size):
    model = build_fssd("fssd_lite", 5, input_size=size).eval()
    with torch.no_grad():
        loc, conf = model(torch.randn(2, 3, size, size))
    assert loc.shape == (2, model.priors.shape[0], 4)
    assert conf.shape == (2, model.priors.shape[0], 5)
    # priors come from the real feature-map sizes: centres inside the image, counts match
    assert (model.priors[:, :2] > 0).all() and (model.priors[:, :2] < 1).all()
    expected = sum(h * w * a for (h, w), a in zip(model.feature_sizes, model.prior_config.anchors_per_location))
    assert model.priors.shape[0] == expected


def test_paper_preset_at_another_size_derives_steps():
    cfg = preset_config("fssd300_vgg16", 21, input_size=320)
    assert cfg.priors.steps is None
    assert preset_config("fssd300_vgg16", 21).priors.steps == (8, 16, 32, 64, 100, 300)


def test_fssd512_shapes():
    model = build_fssd("fssd512_vgg16", 21)
    assert model.feature_sizes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    # 64²·6 + 32²·6 + 16²·6 + 8²·6 + 4²·6 + 2²·4 + 1·4, as the authors' VOC_512 config gives
    assert model.priors.shape == (32756, 4)


def test_configurable_knobs():
    model = build_fssd("fssd_lite", 3, fusion_channels=32, min_scale=0.15, max_scale=0.9, backbone_width=0.5,
                       aspect_ratios=((2,), (2,), (2,), (2,), (2,), (2,)))
    assert model.fusion.bn.num_features == 96
    assert model.prior_config.anchors_per_location == (4,) * 6
    assert model.priors.shape[0] == 4 * sum(h * w for h, w in model.feature_sizes)


def test_config_round_trip():
    cfg = preset_config("fssd512_vgg16", 21)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "shape, match",
    [((3, 256, 256), r"\[N, 3, H, W\]"), ((1, 1, 256, 256), "3 channels"), ((1, 4, 256, 256), "got 4"),
     ((1, 3, 200, 256), "256x256")],
)
def test_bad_images(shape, match):
    model = build_fssd("fssd_lite", 3)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


@pytest.mark.parametrize("n", [1, 0, -3])
def test_num_classes_below_two(n):
    with pytest.raises(ValueError, match=f"num_classes must be an integer >= 2.*{n}"):
        build_fssd("fssd_lite", n)


def test_input_too_small_for_pyramid():
    with pytest.raises(ValueError, match="input_size 64 is too small"):
        build_fssd("fssd300_vgg16", 21, input_size=64)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="unknown preset 'ssd9000'"):
        build_fssd("ssd9000", 21)
    with pytest.raises(ValueError, match="unknown override 'fusion'"):
        build_fssd("fssd_lite", 21, fusion=3)


def test_bad_prior_scales():
    with pytest.raises(ConfigError, match=r"min_scale \(0.9\) must be smaller"):
        build_fssd("fssd_lite", 3, min_scale=0.9, max_scale=0.5)


def test_from_dict_rejects_unknown_and_wrong_type():
    d = preset_config("fssd_lite", 3).to_dict()
    d["model"]["fusion_chanels"] = 3
    with pytest.raises(ConfigError, match="unknown key config.model.fusion_chanels"):
        DetectorConfig.from_dict(d, "config")
    d = preset_config("fssd_lite", 3).to_dict()
    d["priors"]["min_scale"] = "small"
    with pytest.raises(ConfigError, match="config.priors.min_scale must be a number"):
        DetectorConfig.from_dict(d, "config")


@pytest.mark.parametrize("preset", ["fssd300_vgg16", "fssd_lite"])
def test_authors_weight_init_follows_their_rules(preset):
    """The authors' weights_init through Module.apply: BasicConv weights (fusion, pyramid) get
    Kaiming-normal fan_out, bare convs (extras, heads) keep PyTorch's default weight, every bias
    of those modules is 0; the VGG presets use it by default."""
    from fssd.models.fssd import authors_init

    overrides = {} if preset == "fssd300_vgg16" else {"weight_init": "authors"}
    torch.manual_seed(0)
    ours = build_fssd(preset, 5, **overrides)
    torch.manual_seed(0)
    plain = build_fssd(preset, 5, weight_init="pytorch")
    assert ours.config.weight_init == "authors"
    bare = [*zip(ours.loc_head, plain.loc_head), *zip(ours.conf_head, plain.conf_head)]
    if hasattr(ours.backbone, "extras"):
        bare += [(a, b) for a, b in zip(ours.backbone.extras.modules(), plain.backbone.extras.modules())
                 if isinstance(a, torch.nn.Conv2d)]
        assert len(bare) > 12
    for a, b in bare:  # the default weight (same RNG draws), a zero bias
        assert torch.equal(a.weight, b.weight) and not a.bias.any() and b.bias.any()
    basic = [*ours.fusion.reduce, *(layer[0] for layer in ours.pyramid)]
    for conv in basic:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.15)
        assert not conv.bias.any()
    assert torch.equal(ours.fusion.bn.weight, torch.ones_like(ours.fusion.bn.weight))
    # the backbone's own layers (ImageNet-loaded for VGG) are not touched
    layers = getattr(ours.backbone, "layers", None) or ours.backbone.stage1
    for a, b in zip(layers.parameters(), (getattr(plain.backbone, "layers", None) or plain.backbone.stage1).parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="weight_init must be one of"):
        build_fssd(preset, 5, weight_init="xavier")
    torch.manual_seed(1)
    again = build_fssd(preset, 5, weight_init="pytorch")
    authors_init(again)  # the function alone gives the same zero biases
    assert not any(c.bias.any() for c in again.conf_head)
