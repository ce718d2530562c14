import math

import pytest
import torch

from fssd import MultiBoxLoss, build_fssd
from fssd.data.sampler import GlobalBatchSampler
from fssd.engine import BadStepsError, LRSchedule, TrainState, make_ema, param_groups, train_one_epoch


def _batches(n, size=64, poison=()):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = torch.randn(2, 3, size, size, generator=g)
        if i in poison:
            images[0, 0, 0, 0] = float("nan")
        out.append({"images": images, "boxes": torch.tensor([[[0.1, 0.1, 0.6, 0.7]], [[0.3, 0.2, 0.9, 0.8]]]),
                    "labels": torch.tensor([[1], [2]])})
    return out


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = build_fssd("fssd_lite", 3, input_size=64, fusion_channels=8)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    return model, opt, MultiBoxLoss(model.priors)


def test_warmup_really_runs_then_cosine():
    s = LRSchedule(100, warmup_iters=10, warmup_factor=0.1)
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(0.55) and s(10) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.01)
    m = LRSchedule(100, warmup_iters=0, schedule="multistep", milestones=[50, 80], gamma=0.1)
    assert [m(0), m(50), m(80)] == pytest.approx([1.0, 0.1, 0.01])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = s.scheduler(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)  # the first step uses warmup_factor * lr
    opt.step()
    sched.step()
    restored = LRSchedule(100, warmup_iters=10, warmup_factor=0.1).scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2))
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 1


def test_no_weight_decay_on_batchnorm_and_biases(setup):
    model, _, _ = setup
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(names[id(p)].endswith("bn.weight") for p in no_decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_non_finite_steps_are_skipped_and_counted(setup):
    model, opt, crit = setup
    state = TrainState()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_one_epoch(model, _batches(3, poison={1}), crit, opt, None, state, device=torch.device("cpu"))
    assert stats.bad_steps == 1 and stats.steps == 2 and state.bad_steps == 1 and state.consecutive_bad == 0
    assert math.isfinite(stats.loss)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_many_bad_steps_stop_training(setup):
    model, opt, crit = setup
    with pytest.raises(BadStepsError, match="3 consecutive steps had a non-finite loss"):
        train_one_epoch(model, _batches(4, poison={0, 1, 2, 3}), crit, opt, None, TrainState(),
                        device=torch.device("cpu"), max_bad_steps=3)


def test_ema_follows_the_weights_and_frozen_bn_keeps_statistics(setup):
    model, opt, crit = setup
    ema = make_ema(model, decay=0.5)
    stats_before = model.fusion.bn.running_mean.clone()
    train_one_epoch(model, _batches(2), crit, opt, None, TrainState(), device=torch.device("cpu"), ema=ema,
                    freeze_bn=True)
    assert torch.equal(model.fusion.bn.running_mean, stats_before)  # frozen BN: eval-mode statistics
    w, e = model.conf_head[0].weight, ema.module.conf_head[0].weight
    assert not torch.equal(w, e) and ema.n_averaged.item() == 2


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = list(GlobalBatchSampler(20, 8, seed=3))
    two = [list(GlobalBatchSampler(20, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one
    s = GlobalBatchSampler(20, 8, seed=3)
    s.set_epoch(1)
    assert list(s) != one
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(20, 8, world_size=3)
