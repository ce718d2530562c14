import pytest
import torch
import torchvision

from fssd import build_fssd, load_checkpoint, load_model, preset_config, save_checkpoint
from fssd.checkpoint import CheckpointError
from fssd.weights import WeightsError, from_pytorchssd, load_state_dict_file, vgg16_backbone_from_torchvision


def test_torchvision_vgg16_into_reduced_fc_backbone(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(weights=None)  # random init: no download in tests
    path = tmp_path / "vgg16.pth"
    torch.save(tv.state_dict(), path)
    converted = vgg16_backbone_from_torchvision(load_state_dict_file(path))
    model = build_fssd("fssd300_vgg16", 21)
    missing, unexpected = model.backbone.load_state_dict(converted, strict=False)
    assert not unexpected
    assert all(k.startswith("extras.") for k in missing)
    torch.testing.assert_close(model.backbone.layers[0].weight, tv.features[0].weight)
    fc6 = tv.classifier[0].weight.reshape(4096, 512, 7, 7)
    torch.testing.assert_close(model.backbone.layers[31].weight[5, :, 1, 2], fc6[20, :, 3, 6])
    torch.testing.assert_close(model.backbone.layers[33].weight[7, 9, 0, 0], tv.classifier[3].weight[28, 36])
    # conv1..conv5 compute the same features as torchvision's
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = x
        for layer in model.backbone.layers[:30]:
            ours = layer(ours)
        theirs = tv.features[:30](x)
    torch.testing.assert_close(ours, theirs)


def test_torchvision_bn_variant_rejected():
    sd = torchvision.models.vgg16_bn(weights=None).state_dict()
    with pytest.raises(WeightsError, match="vgg16_bn"):
        vgg16_backbone_from_torchvision(sd)


def test_pytorchssd_dataparallel_prefix():
    model = build_fssd("fssd300_vgg16", 21)
    theirs = {}
    for k, v in model.state_dict().items():  # build an authors'-style dict from ours
        k = (k.replace("backbone.layers.", "base.").replace("backbone.extras.", "extras.")
             .replace("fusion.reduce.", "ft_module.").replace("fusion.bn.", "fea_bn."))
        if k.startswith("ft_module."):
            k = k.replace(".weight", ".conv.weight").replace(".bias", ".conv.bias")
        k = k.replace("loc_head.", "loc.").replace("conf_head.", "conf.")
        if k.startswith("pyramid."):
            k = k.replace("pyramid.", "pyramid_ext.").replace(".0.weight", ".conv.weight").replace(".0.bias", ".conv.bias")
        theirs["module." + k] = v
    build_fssd("fssd300_vgg16", 21).load_state_dict(from_pytorchssd(theirs))
    with pytest.raises(WeightsError, match="unexpected key 'module_x'"):
        from_pytorchssd({"module_x": torch.zeros(1)})


def test_checkpoint_round_trip(tmp_path):
    cfg = preset_config("fssd_lite", 4, fusion_channels=32)
    model = build_fssd("fssd_lite", 4, fusion_channels=32).eval()
    path = tmp_path / "m.pt"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(path, model, cfg, ["a", "b", "c"], training={"epoch": 3, "optimizer": opt.state_dict()})
    raw = torch.load(path, weights_only=True)  # safe loading works
    assert raw["format"] == "fssd-checkpoint" and raw["class_names"] == ["a", "b", "c"]
    loaded, payload = load_model(path)
    assert payload["config"] == cfg and payload["training"]["epoch"] == 3
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an FSSD checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    model = build_fssd("fssd_lite", 4)
    with pytest.raises(CheckpointError, match="3 class names"):
        save_checkpoint(tmp_path / "x.pt", model, preset_config("fssd_lite", 5), ["a", "b", "c"])
    assert not (tmp_path / "x.pt").exists()
