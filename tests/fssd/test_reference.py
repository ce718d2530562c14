"""Fidelity: our fssd300_vgg16 against the authors' PytorchSSD FSSD_vgg golden tensors."""

import pytest
import torch

from fssd import MultiBoxLoss, build_fssd, decode, postprocess
from fssd.weights import from_pytorchssd

RTOL = 1e-4


def assert_rel(actual, expected, rtol=RTOL, what=""):
    scale = expected.abs().max().clamp(min=1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def _scaled_state_dict(reference):
    """The reference weights as ours, every conv weight x2.25 as in ``scaled``."""
    s = reference["scaled"]
    sd = from_pytorchssd(reference["state_dict"])
    return {k: v * s["conv_weight_scale"] if v.dim() == 4 else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def scaled_model(reference):
    """fssd300_vgg16 with the reference weights, every conv weight x2.25 as in ``scaled``."""
    s = reference["scaled"]
    sd = _scaled_state_dict(reference)
    model = build_fssd("fssd300_vgg16", 21)
    model.load_state_dict(sd)  # strict: every key maps
    return model


@pytest.fixture(scope="module")
def targets(reference):
    t = reference["loss_targets"]
    m = max(len(x) for x in t)
    boxes = torch.zeros(len(t), m, 4)
    labels = torch.full((len(t), m), -1, dtype=torch.long)
    for i, x in enumerate(t):
        boxes[i, : len(x)] = x[:, :4]
        labels[i, : len(x)] = x[:, 4].long()
    return boxes, labels


def test_parameter_count(reference):
    model = build_fssd("fssd300_vgg16", 21)
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


def test_priors(reference):
    model = build_fssd("fssd300_vgg16", 21)
    assert model.priors.shape == reference["priors"].shape
    assert_rel(model.priors, reference["priors"], what="priors")


def test_eval_forward(reference, scaled_model):
    s = reference["scaled"]
    scaled_model.eval()
    with torch.no_grad():
        loc, conf = scaled_model(reference["input"])
    assert_rel(loc, s["loc"], what="loc")
    assert_rel(conf, s["conf"], what="conf")


def test_train_forward_and_bn_statistics(reference):
    s = reference["scaled"]
    sd = _scaled_state_dict(reference)
    model = build_fssd("fssd300_vgg16", 21)
    model.load_state_dict(sd)
    model.train()
    with torch.no_grad():
        loc, conf = model(reference["input"])
    assert_rel(loc, s["loc_train"], what="loc_train")
    assert_rel(conf, s["conf_train"], what="conf_train")
    bn = model.fusion.bn
    assert_rel(bn.running_mean, s["fea_bn_running_mean_after_train_step"], what="running_mean")
    assert_rel(bn.running_var, s["fea_bn_running_var_after_train_step"], what="running_var")
    model.eval()
    with torch.no_grad():
        loc, conf = model(reference["input"])
    assert_rel(loc, s["loc_eval_after_train_step"], what="loc after train step")
    assert_rel(conf, s["conf_eval_after_train_step"], what="conf after train step")


def test_align_corners_false_matches_master_on_modern_torch(reference):
    s = reference["scaled"]
    sd = _scaled_state_dict(reference)
    model = build_fssd("fssd300_vgg16", 21, align_corners=False)
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        loc, conf = model(reference["input"])
    assert_rel(loc, s["loc_ac_false"], what="loc_ac_false")
    assert_rel(conf, s["conf_ac_false"], what="conf_ac_false")


def test_decoded_boxes(reference):
    s = reference["scaled"]
    model = build_fssd("fssd300_vgg16", 21)
    assert_rel(decode(s["loc"], model.priors, (0.1, 0.2)), s["decoded_boxes"], what="decoded boxes")


def test_loss(reference, targets):
    s = reference["scaled"]
    model = build_fssd("fssd300_vgg16", 21)
    out = MultiBoxLoss(model.priors, iou_threshold=0.5, neg_pos_ratio=3)(s["loc"], s["conf"], *targets)
    assert int(out.num_pos) == 56
    assert_rel(out.loc, s["loss_l"], what="loss_l")
    assert_rel(out.conf, s["loss_c"], what="loss_c")


def test_detections_as_sets(reference):
    """The authors' test_net thresholds: score > 0.03, NMS 0.45 (+1 px), 50 per class, 300 per image."""
    s = reference["scaled"]
    model = build_fssd("fssd300_vgg16", 21)
    dets = postprocess(
        s["loc"], s["conf"], model.priors, image_sizes=[(300, 300)],
        score_threshold=0.03, nms_threshold=0.45, pre_nms_top_k=None, top_k_per_class=50, max_detections=300,
        plus_one=True,
    )
    for ours, ref in zip(dets, s["detections"]):
        assert len(ours["scores"]) == len(ref)
        ref_rows = torch.cat([ref[:, 1:5], ref[:, 5:6], ref[:, 0:1]], dim=1)  # box, score, class
        our_rows = torch.cat([ours["boxes"], ours["scores"][:, None], ours["labels"][:, None].float()], dim=1)
        unmatched = torch.ones(len(our_rows), dtype=torch.bool)
        for row in ref_rows:
            cand = (our_rows[:, 5] == row[5]) & unmatched
            box_err = (our_rows[:, :4] - row[:4]).abs().max(dim=1).values / 300.0
            score_err = (our_rows[:, 4] - row[4]).abs()
            hit = cand & (box_err <= RTOL) & (score_err <= RTOL)
            assert hit.any(), f"reference detection {row.tolist()} has no counterpart"
            unmatched[torch.nonzero(hit)[0, 0]] = False
        assert not unmatched.any()
