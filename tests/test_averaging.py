"""The moving average of the weights (``finetune.ema``): its arithmetic, its checkpoints, and what is validated."""

import numpy as np
import pytest
import torch

from seg.core import finetune as finetune_module
from seg.core.averaging import WeightAverage
from seg.core.checkpoint import load_checkpoint
from seg.core.config import Optimizer, Scheduler, load_experiment
from seg.core.schedules import build_scheduler
from seg.core.train import BEST, LATEST, TrainingLoop, build_optimizer, seed_everything


def small_network() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))


def test_the_average_is_the_hand_computed_moving_average():
    torch.manual_seed(0)
    network = small_network()
    decay = 0.8
    expected = {k: v.double().numpy().copy() for k, v in network.state_dict().items()}
    average = WeightAverage(network, decay)
    for step in range(50):  # through the warm-up: d_t = t / (t + 9) reaches 0.8 at t = 36
        with torch.no_grad():
            for tensor in network.state_dict().values():  # new weights, running statistics and counter
                tensor.copy_(torch.randn(tensor.shape) * 3 if tensor.is_floating_point() else tensor + step + 1)
        average.update(network)
        d = min(decay, (step + 1) / (step + 10))
        for key, value in network.state_dict().items():
            new = value.double().numpy()
            expected[key] = d * expected[key] + (1 - d) * new if value.is_floating_point() else new
    got = average.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].double().numpy(), value, rtol=1e-6, atol=1e-6, err_msg=key)
    assert int(got["1.num_batches_tracked"]) == sum(range(1, 51))  # copied, not averaged
    assert not average.network.training and not any(p.requires_grad for p in average.network.parameters())


def test_a_decay_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match="decay 1.0"):
        WeightAverage(small_network(), 1.0)


def make_loop(run_dir, crash_at=None):
    generator = seed_everything(3)
    network = small_network()
    optimizer = build_optimizer(network.parameters(), Optimizer(lr=5e-2))
    average = WeightAverage(network, 0.7)
    loop = TrainingLoop(run_dir=run_dir, module=network, optimizer=optimizer,
                        scheduler=build_scheduler(optimizer, Scheduler([2], 0.5), 4), device=torch.device("cpu"),
                        epochs=4, steps_per_epoch=3, generator=generator, meta={"kind": "test"}, average=average)
    steps = {"n": 0}

    def compute_loss():
        steps["n"] += 1
        if steps["n"] == crash_at:
            raise KeyboardInterrupt
        x = torch.from_numpy(generator.normal(size=(6, 2)).astype(np.float32))
        return torch.nn.functional.mse_loss(network(x), x.sum(1, keepdim=True)), {}

    return loop, network, average, compute_loss


def test_checkpoints_hold_the_average_as_the_model_and_resume_it_exactly(tmp_path):
    loop, network, average, step = make_loop(tmp_path / "straight")
    loop.run(step)
    saved = load_checkpoint(tmp_path / "straight" / LATEST)
    for key, value in average.state_dict().items():
        assert torch.equal(saved["model"][key], value), key
    for key, value in network.state_dict().items():
        assert torch.equal(saved["training_model"][key], value), key
    assert not torch.equal(saved["model"]["0.weight"], saved["training_model"]["0.weight"])

    loop, _, _, step = make_loop(tmp_path / "resumed", crash_at=8)  # in epoch 3: the checkpoint is epoch 2's
    with pytest.raises(KeyboardInterrupt):
        loop.run(step)
    loop, network, average, step = make_loop(tmp_path / "resumed")
    seed_everything(99)
    loop.resume()
    loop.run(step)
    resumed = load_checkpoint(tmp_path / "resumed" / LATEST)
    for name in ("model", "training_model"):
        for key, value in saved[name].items():
            assert torch.equal(resumed[name][key], value), f"{name}: {key}"


def test_finetune_validates_selects_and_returns_the_average(synth_data, tmp_path, monkeypatch):
    validated = []
    real_validate = finetune_module.validate

    def spy(network, *args, **kwargs):
        validated.append(network)
        return real_validate(network, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "validate", spy)
    exp = load_experiment("smoke", overrides=["finetune.ema=0.5", "finetune.val_every=1"])
    returned = finetune_module.finetune(synth_data, tmp_path / "run", exp, device="cpu", epochs=2)
    latest = load_checkpoint(tmp_path / "run" / LATEST)
    best = load_checkpoint(tmp_path / "run" / BEST)
    assert validated and all(network is returned for network in validated)
    for key, value in returned.state_dict().items():
        assert torch.equal(latest["model"][key], value), key
    weights = [k for k, v in latest["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(latest["model"][k], latest["training_model"][k]) for k in weights)
    assert set(best["model"]) == set(best["training_model"])
