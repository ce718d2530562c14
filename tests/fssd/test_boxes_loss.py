import math

import pytest
import torch

from fssd import MultiBoxLoss, build_fssd, decode, encode, match, postprocess
from fssd.priors import make_priors
from fssd.config import PriorConfig


@pytest.fixture(scope="module")
def priors():
    return build_fssd("fssd_lite", 4).priors


def test_encode_decode_round_trip(priors):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(priors.shape[0], 2, generator=g) * 0.5
    wh = torch.rand(priors.shape[0], 2, generator=g) * 0.4 + 0.05
    boxes = torch.cat([xy, xy + wh], 1)
    torch.testing.assert_close(decode(encode(boxes, priors, (0.1, 0.2)), priors, (0.1, 0.2)), boxes, atol=1e-5, rtol=0)


def _reference_match(truths, labels, priors, thr, variances):
    """Per-image loop, as the authors' match()."""
    from torchvision.ops import box_convert, box_iou
    ov = box_iou(truths, box_convert(priors, "cxcywh", "xyxy"))
    bpo, bpi = ov.max(1)
    bto, bti = ov.max(0)
    bto.index_fill_(0, bpi, 2)
    for j in range(bpi.size(0)):
        bti[bpi[j]] = j
    conf = labels[bti].clone()
    conf[bto < thr] = 0
    return encode(truths[bti], priors, variances), conf


def test_batched_match_equals_per_image_loop(priors):
    g = torch.Generator().manual_seed(1)
    n, m = 4, 6
    xy = torch.rand(n, m, 2, generator=g) * 0.6
    wh = torch.rand(n, m, 2, generator=g) * 0.35 + 0.02
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(1, 4, (n, m), generator=g)
    counts = [6, 3, 1, 0]
    for i, c in enumerate(counts):
        labels[i, c:] = -1
        boxes[i, c:] = 0
    loc_t, conf_t = match(boxes, labels, priors, 0.5, (0.1, 0.2))
    for i, c in enumerate(counts):
        if c == 0:
            assert (conf_t[i] == 0).all()
            continue
        ref_loc, ref_conf = _reference_match(boxes[i, :c], labels[i, :c], priors, 0.5, (0.1, 0.2))
        assert torch.equal(conf_t[i], ref_conf)
        pos = ref_conf > 0
        torch.testing.assert_close(loc_t[i][pos], ref_loc[pos])


def test_loss_without_positives_is_finite(priors):
    loss = MultiBoxLoss(priors)
    loc = torch.randn(2, priors.shape[0], 4, requires_grad=True)
    conf = torch.randn(2, priors.shape[0], 4, requires_grad=True)
    out = loss(loc, conf, torch.zeros(2, 1, 4), torch.full((2, 1), -1))
    assert out.num_pos == 0 and out.loc == 0
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(conf.grad).all() and torch.isfinite(loc.grad).all()


def test_loss_decreases_with_sgd(priors):
    torch.manual_seed(0)
    model = build_fssd("fssd_lite", 4, input_size=128)
    crit = MultiBoxLoss(model.priors)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.55, 0.3, 0.9, 0.9]]])
    labels = torch.tensor([[1, 3]])
    x = torch.randn(1, 3, 128, 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(8):
        out = crit(*model(x), boxes, labels)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "box, msg",
    [([0.5, 0.1, 0.4, 0.6], "x2 <= x1"), ([0.1, 0.1, 1.5, 0.6], r"outside \[0, 1\]"),
     ([0.1, float("nan"), 0.3, 0.6], "non-finite"), ([0.1, 0.2, 0.3, float("inf")], "non-finite")],
)
def test_bad_targets(priors, box, msg):
    loss = MultiBoxLoss(priors)
    with pytest.raises(ValueError, match=msg):
        loss(torch.zeros(1, priors.shape[0], 4), torch.zeros(1, priors.shape[0], 4), torch.tensor([[box]]), torch.tensor([[1]]))


def test_label_out_of_range(priors):
    loss = MultiBoxLoss(priors)
    with pytest.raises(ValueError, match="label 7 is out of range for 4 classes"):
        loss(torch.zeros(1, priors.shape[0], 4), torch.zeros(1, priors.shape[0], 4),
             torch.tensor([[[0.1, 0.1, 0.4, 0.4]]]), torch.tensor([[7]]))


def test_postprocess_batched_equals_single_and_uses_pixels(priors):
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(3, priors.shape[0], 4, generator=g) * 0.5
    conf = torch.randn(3, priors.shape[0], 4, generator=g) * 3
    sizes = [(375, 500), (256, 256), (480, 320)]
    kw = dict(score_threshold=0.2, nms_threshold=0.45, top_k_per_class=20, max_detections=50)
    batched = postprocess(loc, conf, priors, image_sizes=sizes, **kw)
    for i in range(3):
        single = postprocess(loc[i : i + 1], conf[i : i + 1], priors, image_sizes=[sizes[i]], **kw)[0]
        torch.testing.assert_close(batched[i]["boxes"], single["boxes"])
        assert torch.equal(batched[i]["labels"], single["labels"])
        d = batched[i]
        assert len(d["scores"]) <= 50
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        for c in d["labels"].unique():
            assert (d["labels"] == c).sum() <= 20
        # boxes are in pixels of that image
        dec = decode(loc[i], priors, (0.1, 0.2))
        assert d["boxes"][:, 2].max() <= dec[:, 2].max() * sizes[i][1] + 1e-3


def test_postprocess_empty():
    pri = make_priors([(2, 2), (1, 1)], 64, PriorConfig(aspect_ratios=((2,), (2,))))
    conf = torch.zeros(2, pri.shape[0], 3)
    conf[..., 0] = 10  # everything is background
    out = postprocess(torch.zeros(2, pri.shape[0], 4), conf, pri, image_sizes=[(64, 64)], score_threshold=0.1)
    assert [len(d["scores"]) for d in out] == [0, 0]


def test_difficult_objects_in_each_mode_target_ignore_drop():
    """A difficult object as a target (the authors' keep_difficult), as an ignore region (its
    priors neither positive nor mined), or dropped (its prior becomes a hard negative)."""
    import torch.nn.functional as F

    priors = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2],
                           [0.25, 0.75, 0.2, 0.2], [0.75, 0.25, 0.2, 0.2]])
    easy, difficult = [0.15, 0.15, 0.35, 0.35], [0.65, 0.65, 0.85, 0.85]  # exactly priors 0 and 1
    loc = torch.zeros(1, 4, 4)
    # prior 1 (on the difficult object) has the highest background loss, then prior 2
    conf = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 2.0, 0.0], [0.0, 0.5, 0.0]]])
    ce = lambda i, c: float(F.cross_entropy(conf[0, i:i + 1], torch.tensor([c])))  # noqa: E731
    loss = MultiBoxLoss(priors, neg_pos_ratio=1.0)
    boxes = torch.tensor([[easy, difficult]])

    target = loss(loc, conf, boxes, torch.tensor([[1, 2]]))
    assert int(target.num_pos) == 2  # both objects are positives
    assert float(target.conf) == pytest.approx((ce(0, 1) + ce(1, 2) + ce(2, 0) + ce(3, 0)) / 2, rel=1e-5)

    drop = loss(loc, conf, torch.tensor([[easy, [0, 0, 0, 0]]]), torch.tensor([[1, -1]]))
    assert int(drop.num_pos) == 1  # the difficult object's prior is mined as the hard negative
    assert float(drop.conf) == pytest.approx(ce(0, 1) + ce(1, 0), rel=1e-5)

    ignore = loss(loc, conf, boxes, torch.tensor([[1, 2]]), torch.tensor([[False, True]]))
    assert int(ignore.num_pos) == 1  # neither positive nor negative: the next prior is mined
    assert float(ignore.conf) == pytest.approx(ce(0, 1) + ce(2, 0), rel=1e-5)
    assert float(ignore.loc) == pytest.approx(float(drop.loc))
