"""What the CUDA code paths do that a CPU can check: the training loop's AMP machinery when disabled, FP16
autocast of float32 inputs through the inferers, NCCL and the local device under torchrun, checkpoints written
on a GPU loaded and resumed on a CPU, and benchmarks/gpu_check.py without a GPU. (The real GPU figures come
from benchmarks/gpu_check.py on a CUDA machine; tests/test_inferers.py covers device and precision rules.)"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.serialization
from torch import nn

from seg.core import distributed
from seg.core.checkpoint import load_checkpoint, save_checkpoint
from seg.core.inference import autocast_context, class_argmax
from seg.core.train import LATEST, TrainingLoop, seed_everything
from seg.plugins.inferers import WholeVolume, ZSlidingWindow

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def linear_loop(run_dir, x, y, lr=0.1):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loop = TrainingLoop(run_dir=run_dir, module=model, optimizer=optimizer,
                        scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, [], 1.0), device=CPU, epochs=1,
                        steps_per_epoch=1, generator=seed_everything(0), meta={"kind": "test"})
    seen = {}

    def compute_loss():
        out = model(x)
        seen.update(dtype=out.dtype, autocast=torch.is_autocast_enabled("cpu"))
        return nn.functional.mse_loss(out, y), {}

    return loop, model, compute_loss, seen


def test_amp_machinery_disabled_on_cpu_makes_a_plain_sgd_step(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    loop, model, compute_loss, seen = linear_loop(tmp_path, torch.tensor(x, dtype=torch.float32),
                                                  torch.tensor(y, dtype=torch.float32))
    w, b = model.weight.detach().double().numpy().T.copy(), model.bias.detach().double().numpy().copy()
    assert not loop.amp and not loop.scaler.is_enabled()
    loop.run(compute_loss)
    assert seen == {"dtype": torch.float32, "autocast": False}
    residual = x @ w + b - y  # d/dw mean(r^2) = 2/N x^T r: no loss scale left in the step
    expected_w = w - 0.1 * 2 / len(x) * x.T @ residual
    expected_b = b - 0.1 * 2 / len(x) * residual.sum(0)
    np.testing.assert_allclose(model.weight.detach().numpy().T, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias.detach().numpy(), expected_b, rtol=1e-5, atol=1e-6)


def test_fp16_autocast_casts_float32_inputs():
    conv = nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 4, 5, 6)
    with autocast_context(CPU, "fp16"):
        out = conv(x)
    assert x.dtype == torch.float32 and out.dtype == torch.float16
    np.testing.assert_allclose(out.float().detach().numpy(), conv(x).detach().numpy(), atol=1e-2)


@pytest.mark.parametrize("inferer", [ZSlidingWindow(window=8, divisor=2), ZSlidingWindow(window=8, divisor=2, batch=2),
                                     ZSlidingWindow(window=8, divisor=2, mirror=["x"]), WholeVolume(divisor=2)])
def test_fp16_inference_path_matches_fp32(inferer):
    """The precision CUDA runs at (resolve_precision never picks fp16 on a CPU: here it is forced)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 5, 3, padding=1)).eval()
    image = torch.randn(1, 1, 21, 10, 12)
    exact = inferer(net, image, device=CPU, precision="fp32")
    computed = []
    net[0].register_forward_hook(lambda module, args, out: computed.append((args[0].dtype, out.dtype)))
    half = inferer(net, image, device=CPU, precision="fp16")
    assert set(computed) == {(torch.float32, torch.float16)}  # the float32 image cast: a float16 convolution
    assert half.dtype == torch.float16 and half.device == CPU and half.shape == exact.shape
    torch.testing.assert_close(half.float(), exact, atol=5e-3, rtol=0)
    top2 = exact.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-2
    assert torch.equal(class_argmax(half)[clear], class_argmax(exact)[clear])
    if hasattr(inferer, "labels"):
        labels = inferer.labels(net, image, device=CPU, precision="fp16")
        assert torch.equal(labels[clear], class_argmax(exact)[clear])


@pytest.mark.parametrize("device, backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_torchrun_process_takes_nccl_and_its_local_gpu_on_cuda(monkeypatch, device, backend):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("device", index)))
    assert distributed.init_from_env(torch.device(device))
    assert calls == [("init", backend)] + ([("device", 1)] if device == "cuda" else [])


def save_as_if_on_gpu(payload, path, monkeypatch):
    """Write a checkpoint whose tensors are recorded as CUDA tensors, as one written on a GPU is."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(payload, path)


def test_checkpoint_written_on_a_gpu_loads_on_a_cpu(tmp_path, monkeypatch):
    path = tmp_path / "gpu.pt"
    save_as_if_on_gpu({"model": {"w": torch.arange(4.0)}}, path, monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # what loading without a CPU map would do here
    for mmap in (False, True):
        state = load_checkpoint(path, mmap=mmap)
        assert state["model"]["w"].device == CPU and torch.equal(state["model"]["w"], torch.arange(4.0))


def test_a_gpu_run_resumes_on_a_cpu(tmp_path, monkeypatch):
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    loop, _, compute_loss, _ = linear_loop(tmp_path, x, y)
    loop.run(compute_loss)
    state = load_checkpoint(tmp_path / LATEST)
    state["scaler"] = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 7}  # what a GradScaler on CUDA leaves
    for rank_state in state["rng"]:
        rank_state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    save_as_if_on_gpu(state, tmp_path / LATEST, monkeypatch)
    loop, model, compute_loss, _ = linear_loop(tmp_path, x, y)
    loop.epochs = 2
    loop.resume()
    assert loop.epoch == 1 and not loop.scaler.is_enabled()
    loop.run(compute_loss)
    assert loop.epoch == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_gpu_check_without_cuda_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # hides any GPU
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().count("\n") == 0 and "no CUDA GPU" in result.stdout
