"""Training precision (``finetune.precision``): reduced precision runs the network's forward pass under
autocast and nothing else (weights, augmentation and loss stay float32); the CPU always trains at fp32."""

import numpy as np
import pytest
import torch
from torch import nn

import seg.core.finetune as finetune_module
import seg.core.train as train_module
from seg.core import inference, plugins
from seg.core.checkpoint import load_checkpoint
from seg.core.config import load_experiment
from seg.core.console import set_quiet
from seg.core.errors import ConfigError
from seg.core.train import LATEST, TrainingLoop, full_precision, seed_everything, training_precision

CPU = torch.device("cpu")


def linear_step(tmp_path, precision, x, y):
    """One SGD step (lr 0.1) of a 3 -> 1 linear model on mean squared error, the loop at ``precision``; the
    loop, the model, what ``compute_loss`` saw and the weights before the step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainingLoop(run_dir=tmp_path, module=model, optimizer=optimizer,
                        scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, [], 1.0), device=CPU, epochs=1,
                        steps_per_epoch=1, generator=seed_everything(0), meta={"kind": "test"}, precision=precision)
    before = model.weight.detach().double().numpy().T.copy(), model.bias.detach().double().numpy().copy()
    seen = {}

    def compute_loss():
        out = model(x)
        with full_precision(CPU):
            seen.update(out=out.dtype, inside=torch.is_autocast_enabled("cpu"))
            return nn.functional.mse_loss(out.float(), y), {}

    loop.run(compute_loss)
    return loop, model, seen, before


def test_bf16_loop_runs_the_forward_in_bfloat16_and_steps_float32_weights(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)), rng.normal(size=(64, 1))
    loop, model, seen, (w, b) = linear_step(tmp_path, "bf16", torch.tensor(x, dtype=torch.float32),
                                            torch.tensor(y, dtype=torch.float32))
    assert loop.precision == "bf16" and not loop.amp and not loop.scaler.is_enabled()
    assert seen["out"] == torch.bfloat16 and seen["inside"] is False
    assert model.weight.dtype == torch.float32 and model.bias.dtype == torch.float32
    # the float32 step, computed independently in float64: bf16 lands near it, but not on it
    residual = x @ w + b - y
    expected_w = w - 0.1 * 2 / len(x) * x.T @ residual
    got_w = model.weight.detach().double().numpy().T
    np.testing.assert_allclose(got_w, expected_w, rtol=0.02, atol=0.01)
    assert np.abs(got_w - expected_w).max() > 1e-5, "no bfloat16 rounding: the forward ran at float32"


@pytest.mark.parametrize("asked", ["auto", "fp32", "fp16", "bf16"])
def test_the_cpu_trains_at_fp32_whatever_is_asked(tmp_path, monkeypatch, asked):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    notes = []
    monkeypatch.setattr(train_module, "info", notes.append)
    assert training_precision(asked, CPU) == "fp32"
    assert bool(notes) == (asked in ("fp16", "bf16"))
    loop, _, seen, _ = linear_step(tmp_path, "auto", torch.ones(4, 3), torch.zeros(4, 1))
    assert loop.precision == "fp32" and seen["out"] == torch.float32


@pytest.mark.parametrize("asked, gpu_bf16, resolved", [("auto", True, "fp16"), ("bf16", True, "bf16"),
                                                        ("bf16", False, "fp16"), ("fp32", True, "fp32")])
def test_cuda_trains_at_the_precision_asked(monkeypatch, asked, gpu_bf16, resolved):
    monkeypatch.setattr(inference, "cuda_has_bf16", lambda: gpu_bf16)
    assert training_precision(asked, torch.device("cuda")) == resolved


def test_an_unknown_precision_is_a_one_line_error():
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        training_precision("fp8", CPU)


def test_reduced_precision_finetune_keeps_augmentation_and_loss_float32(tmp_path, synth_data, monkeypatch):
    """CUDA's fp16 path, forced on the CPU (its bf16 conv3d gradients are broken; fp16's are not)."""
    set_quiet(True)
    seen = {"augment": [], "loss": [], "network": []}
    augment = finetune_module.augment_batch

    def spy_augment(x, y, cfg, seed):
        seen["augment"].append(torch.is_autocast_enabled("cpu"))
        return augment(x, y, cfg, seed)

    get = plugins.get

    def spy_get(family, name):
        factory = get(family, name)
        if family != "losses":
            return factory

        def make(*args, **kwargs):
            loss = factory(*args, **kwargs)

            def spy_loss(logits, labels):
                seen["loss"].append((logits.dtype, torch.is_autocast_enabled("cpu")))
                return loss(logits, labels)
            return spy_loss
        return make

    build = finetune_module.build_backbone

    def spy_build(*args, **kwargs):
        network = build(*args, **kwargs)
        network.register_forward_hook(lambda m, i, out: seen["network"].append((m.training, out.dtype)))
        return network

    monkeypatch.setattr(finetune_module, "augment_batch", spy_augment)
    monkeypatch.setattr(plugins, "get", spy_get)
    monkeypatch.setattr(finetune_module, "build_backbone", spy_build)
    monkeypatch.setattr(train_module, "training_precision", lambda precision, device: "fp16")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="CUDA is not available"):  # the gradient scaler, off on a CPU
        finetune_module.finetune(synth_data, run, load_experiment("smoke"), device="cpu", epochs=1)
    assert seen["augment"] == [False, False]  # smoke: 2 steps per epoch
    assert seen["loss"] == [(torch.float32, False)] * 2
    assert {dtype for training, dtype in seen["network"] if training} == {torch.float16}
    weights = load_checkpoint(run / LATEST)["model"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert "training at fp16" in (run / "log.txt").read_text()
