"""Learning-rate schedules against torch's own schedulers and the published formulas."""

import math

import pytest
import torch

from seg.core.config import Scheduler
from seg.core.errors import ConfigError
from seg.core.config import load_experiment
from seg.core.schedules import build_scheduler, lr_factor


def lrs(scheduler, optimizer, epochs):
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def optimizer(lr=0.01):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_multistep_matches_torch_multisteplr():
    ours, theirs = optimizer(), optimizer()
    mine = lrs(build_scheduler(ours, Scheduler([3, 5, 5, 9], 0.5), 12), ours, 12)
    ref = lrs(torch.optim.lr_scheduler.MultiStepLR(theirs, [3, 5, 5, 9], 0.5), theirs, 12)
    assert mine == pytest.approx(ref, rel=1e-12)


def test_cosine_matches_torch_cosine_annealing():
    ours, theirs = optimizer(), optimizer()
    mine = lrs(build_scheduler(ours, Scheduler(name="cosine", min_factor=0.1), 20), ours, 20)
    ref = lrs(torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=20, eta_min=0.001), theirs, 20)
    assert mine == pytest.approx(ref, rel=1e-9)


def test_poly_is_nnunets_formula():
    """nnU-Net's PolyLRScheduler: initial_lr * (1 - epoch / max_epochs) ** 0.9."""
    ours = optimizer(0.01)
    mine = lrs(build_scheduler(ours, Scheduler(name="poly"), 50), ours, 50)
    assert mine == pytest.approx([0.01 * (1 - e / 50) ** 0.9 for e in range(50)], rel=1e-12)


def test_linear_warmup_then_poly():
    cfg = Scheduler(name="poly", warmup_epochs=4, power=1.0)
    factors = [lr_factor(cfg, e, 14) for e in range(14)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # (e + 1) / 4 times a decay not yet begun
    assert factors[4:] == pytest.approx([1 - k / 10 for k in range(10)])  # linear decay over the other 10


def test_warmup_with_multistep_and_constant():
    assert [lr_factor(Scheduler([2], 0.1, warmup_epochs=2), e, 4) for e in range(4)] == pytest.approx(
        [0.5, 1.0, 0.1, 0.1])
    assert [lr_factor(Scheduler(name="constant", warmup_epochs=3), e, 5) for e in range(5)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 1])


def test_schedule_resumes_exactly():
    cfg = Scheduler(name="cosine", warmup_epochs=2)
    first = optimizer()
    sched = build_scheduler(first, cfg, 10)
    lrs(sched, first, 4)
    state, opt_state = sched.state_dict(), first.state_dict()
    second = optimizer()
    resumed = build_scheduler(second, cfg, 10)
    second.load_state_dict(opt_state)  # as TrainingLoop.resume does: the optimizer holds the current lr
    resumed.load_state_dict(state)
    assert second.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(cfg, 4, 10))
    assert math.isclose(lrs(resumed, second, 6)[-1], 0.01 * lr_factor(cfg, 9, 10))


def test_unknown_schedule_names_the_key():
    with pytest.raises(ConfigError, match="finetune.scheduler"):
        load_experiment("smoke", ["finetune.scheduler.name=\"linear\""])
