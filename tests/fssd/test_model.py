import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fssd
from fssd import build_fssd, preset_config
from fssd.config import ConfigError, DetectorConfig


FORBIDDEN = {"ray", "mlflow", "dvc", "boto3", "botocore", "yaml"}


def _fssd_imports() -> dict[str, set[str]]:
    """The top-level packages that each module of fssd/ imports (absolute imports, anywhere in it)."""
    root = Path(fssd.__file__).parent
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value).split(".")[0])
        found[path.relative_to(root.parent).as_posix()] = names
    return found


def test_import_fssd_loads_no_framework():
    """The library boundary: no module of fssd/ imports ray, mlflow, dvc, boto3 or yaml (its own
    import statements, read with ast; what a dependency imports is the dependency's business)."""
    imports = _fssd_imports()
    assert "fssd/models/fssd.py" in imports and "torch" in imports["fssd/models/fssd.py"]  # the reader works
    bad = {module: sorted(names & FORBIDDEN) for module, names in imports.items() if names & FORBIDDEN}
    assert not bad, f"fssd imports frameworks: {bad}"


def test_import_fssd_is_lazy():
    """`import fssd`, the config and the preset tables load no torch (params validation and the CLI
    use them); the public names load it on first use."""
    code = (
        "import sys, fssd, fssd.config, fssd.models.presets, fssd.data.scene_spec\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'cv2') if m in sys.modules))\n"
        "import fssd.engine\n"  # imports the submodule fssd.postprocess: fssd.postprocess stays the function
        "print(fssd.build_fssd.__module__, fssd.postprocess.__module__, fssd.FSSD.__name__)\n"
        "print(callable(fssd.postprocess), set(fssd.__all__) <= set(dir(fssd)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", f"import fssd loaded {out[0]}"
    assert out[1] == "fssd.models.presets fssd.postprocess FSSD"
    assert out[2] == "True True"


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
