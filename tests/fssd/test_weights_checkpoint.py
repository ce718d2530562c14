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


def _micro(num_classes: int, seed: int, **overrides):
    torch.manual_seed(seed)
    return build_fssd("fssd_lite", num_classes, input_size=64, fusion_channels=8, **overrides)


def test_transfer_detector_copies_matching_class_rows():
    from fssd.weights import TransferReport, transfer_detector

    source = _micro(4, seed=1)  # classes a, b, c
    with torch.no_grad():  # randomise every tensor, so that nothing equals a fresh init by chance
        for name, t in source.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t))
    target = _micro(4, seed=2)  # classes b, c, d
    fresh = {k: v.clone() for k, v in target.state_dict().items()}

    report = transfer_detector(source.state_dict(), ["a", "b", "c"], target, ["b", "c", "d"])
    assert isinstance(report, TransferReport)
    assert (report.copied, report.new, report.dropped) == (("b", "c"), ("d",), ("a",))
    src, tgt = source.state_dict(), target.state_dict()
    heads = [k for k in tgt if k.startswith("conf_head.")]
    assert report.conf_keys == len(heads) == 12 and report.loaded_keys == len(tgt) - len(heads)
    assert "re-initialised: d" in report.describe() and "dropped: a" in report.describe()
    for key, value in tgt.items():  # backbone, fusion (BatchNorm buffers too), pyramid, loc heads
        if not key.startswith("conf_head."):
            assert torch.equal(value, src[key]), key
    for i, anchors in enumerate(target.prior_config.anchors_per_location):
        for part in ("weight", "bias"):
            key = f"conf_head.{i}.{part}"
            s = src[key].reshape(anchors, 4, *src[key].shape[1:])  # channel a*C + c: anchor-major
            t = tgt[key].reshape(anchors, 4, *tgt[key].shape[1:])
            f = fresh[key].reshape(anchors, 4, *fresh[key].shape[1:])
            for t_col, s_col in ((0, 0), (1, 2), (2, 3)):  # background, b, c
                assert torch.equal(t[:, t_col], s[:, s_col]), (key, t_col)
            assert torch.equal(t[:, 3], f[:, 3]), key  # d keeps the fresh init
            assert not torch.equal(t[:, 3], s[:, 1])
    # through forward: the same logits for background, b and c (the layout FSSD.forward reads)
    source.eval(), target.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (loc_s, conf_s), (loc_t, conf_t) = source(x), target(x)
    torch.testing.assert_close(loc_t, loc_s)
    torch.testing.assert_close(conf_t[..., :3], conf_s[..., [0, 2, 3]])


def test_transfer_detector_rejects_another_architecture():
    from fssd.weights import transfer_detector

    source = _micro(4, seed=1)
    target = build_fssd("fssd_lite", 4, input_size=64, fusion_channels=16)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"'fusion\.reduce\.0\.weight'.*fusion_channels"):
        transfer_detector(source.state_dict(), ["a", "b", "c"], target, ["b", "c", "d"])
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing changed
    with pytest.raises(ValueError, match=r"num_classes=4 \(background included\) but 2 target classes"):
        transfer_detector(source.state_dict(), ["a", "b", "c"], _micro(4, seed=0), ["b", "c"])
    with pytest.raises(ValueError, match="'conf_head.0.weight'"):  # source classes do not fit its heads
        transfer_detector(source.state_dict(), ["a", "b"], _micro(4, seed=0), ["b", "c", "d"])


def test_transfer_detector_class_map_copies_differently_spelled_classes():
    from fssd.weights import VOC_FROM_COCO, transfer_detector

    source = _micro(4, seed=1)  # a, b, c
    target = _micro(4, seed=2)  # b, c, d with d <- a
    report = transfer_detector(source.state_dict(), ["a", "b", "c"], target, ["b", "c", "d"], class_map={"d": "a"})
    assert (report.copied, report.new, report.dropped) == (("b", "c", "d"), (), ())
    key = "conf_head.0.weight"
    anchors = target.prior_config.anchors_per_location[0]
    s = source.state_dict()[key].reshape(anchors, 4, -1)
    t = target.state_dict()[key].reshape(anchors, 4, -1)
    assert torch.equal(t[:, 3], s[:, 1])  # d's rows are a's
    with pytest.raises(ValueError, match="class_map names 'x'"):
        transfer_detector(source.state_dict(), ["a", "b", "c"], _micro(4, seed=3), ["b", "c", "d"], class_map={"x": "a"})
    assert len(VOC_FROM_COCO) == 6 and VOC_FROM_COCO["tvmonitor"] == "tv"
