"""The ``pcrl`` SSL task on a tiny U-Net: contract, gradients, learning, checkpointing, option errors.

``TinyUNet`` and the synthetic volumes here are shared with the other SSL test files.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg.core import plugins
from seg.core.errors import ConfigError
from seg.plugins.pcrl import PCRL



def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """A 3-level U-Net with batch norm following ``seg.core.backbone.EncoderDecoder`` (base width 4)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 4):
        super().__init__()
        self.enc1, self.enc2 = _block(in_channels, width), _block(width, 2 * width)
        self.enc3 = _block(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose3d(4 * width, 2 * width, 2, 2), _block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose3d(2 * width, width, 2, 2), _block(2 * width, width)
        self.head = nn.Conv3d(width, out_channels, 1)

    def encode(self, x):
        """Feature maps, finest first."""
        f1 = self.enc1(x)
        f2 = self.enc2(F.max_pool3d(f1, 2))
        return [f1, f2, self.enc3(F.max_pool3d(f2, 2))]

    def decode(self, features):
        """Output from the feature maps."""
        f1, f2, f3 = features
        x = self.dec2(torch.cat([self.up2(f3), f2], 1))
        return self.head(self.dec1(torch.cat([self.up1(x), f1], 1)))

    def encoder_modules(self):
        """The encoder's child modules."""
        return ["enc1", "enc2", "enc3"]

    def forward(self, x):
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))


def smooth_volumes(n: int, shape=(16, 24, 24), seed: int = 0) -> torch.Tensor:
    """(n, 1, *shape) products of low-frequency sinusoids with random frequencies and phases."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.linspace(0, torch.pi, s) for s in shape], indexing="ij")
    volumes = []
    for _ in range(n):
        f, p = torch.rand(3, generator=g) * 2 + 0.5, torch.rand(3, generator=g) * 6.28
        volumes.append(torch.sin(f[0] * z + p[0]) * torch.cos(f[1] * y + p[1]) + torch.sin(f[2] * x + p[2]))
    return torch.stack(volumes)[:, None]


def centred_blobs(n: int, side: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 1, side^3) smooth blobs centred in the cube: flips and quarter turns leave them unchanged."""
    g = torch.Generator().manual_seed(seed)
    c = torch.linspace(-1, 1, side)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    volumes = []
    for _ in range(n):
        a, b, w = torch.rand(3, generator=g) + 0.3
        volumes.append(torch.exp(-z * z / a - (y * y + x * x) / b) * 2 * w - 0.5)
    return torch.stack(volumes)[:, None]


def tiny_pcrl(**options) -> PCRL:
    """A PCRL task on a ``TinyUNet`` with a 16-key queue and 16^3 crops (``options`` override)."""
    return PCRL(TinyUNet(), **{"queue_size": 16, "crop_size": (16, 16, 16)} | options)


def train(task, batches, steps: int, lr: float = 1e-3) -> list[dict]:
    """``steps`` Adam steps of ``task`` on ``batches(step)``, as the training loop does; the metrics of each."""
    optimizer = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        loss, metrics = task(batches(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.after_optimizer_step()
        history.append(metrics)
    return history


def test_registered_with_official_defaults():
    assert plugins.get("ssl_tasks", "pcrl") is PCRL
    task = PCRL(TinyUNet())
    assert task.queue.keys.shape == (16384, 128) and task.temperature == 0.2 and task.momentum == 0.999
    assert task.augmentation.crop_size == (32, 64, 64) and task.augmentation.inpaint_rate == 0.2


def test_step_metrics_and_gradients():
    torch.manual_seed(0)
    task = tiny_pcrl()
    loss, metrics = task.training_step(smooth_volumes(3))
    assert set(metrics) == {"loss", "mse", "contrastive", "contrastive_acc"}
    assert metrics["loss"] == pytest.approx(metrics["mse"] + metrics["contrastive"], rel=1e-5)
    assert 0.0 <= metrics["contrastive_acc"] <= 1.0
    loss.backward()
    for name in ("backbone.enc1.0.weight", "backbone.dec1.0.weight", "backbone.head.weight",
                 "projection.fc2.weight", "transform_attention.fc1.weight"):
        grad = dict(task.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for n, p in task.named_parameters() if n.startswith("momentum_"))


def test_momentum_encoder_is_the_encoder_only_and_starts_as_a_copy():
    task = tiny_pcrl()
    names = {k.split(".")[0] for k in task.momentum_backbone.state_dict()}
    assert names == {"enc1", "enc2", "enc3"}
    for name, p in task.momentum_backbone.state_dict().items():
        assert torch.equal(p, task.backbone.state_dict()[name]), name


def test_loss_weights_scale_the_terms():
    torch.manual_seed(1)
    _, metrics = tiny_pcrl(contrastive_weight=0.5, reconstruction_weight=2.0).training_step(smooth_volumes(2))
    assert metrics["loss"] == pytest.approx(0.5 * metrics["contrastive"] + 2.0 * metrics["mse"], rel=1e-5)


def test_queue_takes_the_three_key_sets_of_every_rank():
    task = tiny_pcrl(queue_size=64)
    train(task, lambda step: smooth_volumes(2, seed=step), steps=2)
    assert int(task.queue.pointer) == 2 * 3 * 2
    assert torch.allclose(task.queue.keys[:12].norm(dim=1), torch.ones(12))


def test_reconstruction_loss_falls():
    torch.manual_seed(0)
    task = tiny_pcrl(crop_scales=[(1, 1, 1)], flip_rate=0.0)
    batch = centred_blobs(2)  # unchanged by flips/turns: the targets depend on the corruption only
    history = train(task, lambda step: batch, steps=40)
    start, end = history[0]["mse"], sum(h["mse"] for h in history[-5:]) / 5
    assert end < 0.4 * start, (start, end)


def test_contrastive_accuracy_rises_above_chance():
    torch.manual_seed(0)
    task = tiny_pcrl(momentum=0.9)
    history = train(task, lambda step: smooth_volumes(4, seed=step), steps=20)
    chance = 1 / (16 + 1)
    assert sum(h["contrastive_acc"] for h in history[-10:]) / 10 > 4 * chance


def test_state_dict_round_trip_keeps_queue_and_momentum_encoder():
    torch.manual_seed(0)
    task = tiny_pcrl()
    train(task, lambda step: smooth_volumes(2, seed=step), steps=2)
    state = task.state_dict()
    assert {"queue.keys", "queue.pointer", "momentum_projection.fc1.weight"} <= set(state)
    fresh = tiny_pcrl()
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_option_and_backbone_errors():
    with pytest.raises(ConfigError, match="1 output channel"):
        PCRL(TinyUNet(out_channels=3))
    with pytest.raises(ConfigError, match="EncoderDecoder"):
        PCRL(nn.Conv3d(1, 1, 1))
    for option, value in [("queue_size", 0), ("temperature", -1.0), ("momentum", 1.0), ("mixup_alpha", 0),
                          ("contrastive_weight", -1), ("crop_size", [8, 8])]:
        with pytest.raises(ConfigError, match=option):
            tiny_pcrl(**{option: value})


# ---- as the official code trains it: view augmentations, targets, queue order, optimizer and schedule -----

IDENTITY_VIEWS = {"crop_size": (16, 16, 16), "crop_scales": [(1, 1, 1)], "blur_rate": 0.0, "view_flip_rate": 1.0,
                  "view_rotation": 0.0, "view_scale": (1.0, 1.0)}


def encoded_inputs(task, batch) -> list[torch.Tensor]:
    """The inputs of the ordinary encoder during one training step of ``task``."""
    seen, encode = [], task.backbone.encode
    task.backbone.encode = lambda x: seen.append(x.detach().clone()) or encode(x)
    try:
        task.training_step(batch)
    finally:
        del task.backbone.encode
    return seen


@pytest.mark.parametrize("name", ["pcrl", "contrastive"])
def test_both_tasks_give_every_view_the_official_flip_and_affine(name, monkeypatch):
    from seg.plugins import ssl_transforms

    calls, real = [], ssl_transforms.random_view_affine
    monkeypatch.setattr(ssl_transforms, "random_view_affine",
                        lambda x, *args: calls.append((x.shape, args[:3])) or real(x, *args))
    task = plugins.get("ssl_tasks", name)(TinyUNet(), queue_size=16, crop_size=(16, 16, 16))
    task.training_step(smooth_volumes(2))
    assert calls == [((2, 1, 16, 16, 16), (0.5, 10.0, (0.9, 1.1)))] * 2  # each view, on its own draw
    batch = smooth_volumes(2, shape=(16, 16, 16))  # the encoder sees the flipped view itself
    task = plugins.get("ssl_tasks", name)(TinyUNet(), queue_size=16, paint_rate=0.0, **IDENTITY_VIEWS)
    assert torch.equal(encoded_inputs(task, batch)[0], batch.flip(-1))


@pytest.mark.parametrize("targets", ["clean", "official"])
def test_reconstruction_targets_clean_or_official(targets, monkeypatch):
    from seg.plugins import ssl_transforms

    monkeypatch.setattr(ssl_transforms, "random_flip_rotate",  # no target transform: compare the views themselves
                        lambda x, rate, generator=None: (x, torch.tensor([[0.0] * 3 + [1, 0, 0, 0]] * len(x))))
    seen, mse = [], F.mse_loss
    monkeypatch.setattr(F, "mse_loss", lambda out, target: seen.append(target.clone()) or mse(out, target))
    batch = smooth_volumes(1, shape=(16, 16, 16))  # one sample: mixup with itself changes nothing
    task = PCRL(TinyUNet(), queue_size=16, paint_rate=1.0, targets=targets, **IDENTITY_VIEWS)
    corrupted = encoded_inputs(task, batch)[0]
    clean = batch.flip(-1)  # the view after the loader's flip, before painting
    assert not torch.allclose(corrupted, clean)
    if targets == "clean":
        torch.testing.assert_close(seen[0], clean)
        torch.testing.assert_close(seen[2], clean)
    else:  # the official code: the corrupted input transformed, and for mixup the crop before flip and affine
        torch.testing.assert_close(seen[0], corrupted)
        torch.testing.assert_close(seen[2], batch)


@pytest.mark.parametrize("enqueue", ["after_step", "between_terms"])
def test_queue_read_before_the_step_or_between_terms(enqueue, monkeypatch):
    from seg.plugins import moco

    calls, info_nce = [], moco.KeyQueue.info_nce
    monkeypatch.setattr(moco.KeyQueue, "info_nce",
                        lambda self, q, k, t: calls.append((self.keys.clone(), k.detach().clone())) or info_nce(self, q, k, t))
    torch.manual_seed(0)
    task = tiny_pcrl(enqueue=enqueue)
    loss, _ = task.training_step(smooth_volumes(2))
    loss.backward()  # the queue may change between the terms and the backward pass
    start = calls[0][0]
    if enqueue == "after_step":
        assert all(torch.equal(keys, start) for keys, _ in calls) and int(task.queue.pointer) == 0
    else:  # each term's keys are in the queue the next term reads
        torch.testing.assert_close(calls[1][0][:2], calls[0][1])
        torch.testing.assert_close(calls[2][0][2:4], calls[1][1])
        torch.testing.assert_close(calls[2][0][4:], start[4:])
        assert int(task.queue.pointer) == 6
    task.after_optimizer_step()
    assert int(task.queue.pointer) == 6  # three key sets of 2, enqueued once either way
    with pytest.raises(ConfigError, match="enqueue"):
        tiny_pcrl(enqueue="sometimes")
    with pytest.raises(ConfigError, match="targets"):
        tiny_pcrl(targets="noisy")


def test_official_optimizer_and_schedule():
    from seg.core.config import Optimizer, load_experiment
    from seg.core.schedules import lr_factor
    from seg.core.train import build_optimizer

    exp = load_experiment("flare22-pcrl-official-vnet")
    cfg = exp.pretrain
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay,
            cfg.optimizer.nesterov, cfg.batch_size) == ("sgd", 1e-3, 0.9, 1e-4, False, 16)
    assert cfg.ssl.options == {"targets": "official", "enqueue": "between_terms"}
    for epoch in range(cfg.epochs + 1):  # official adjust_learning_rate: lr * 0.5 * (1 + cos(pi * epoch / epochs))
        assert lr_factor(cfg.scheduler, epoch, cfg.epochs) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs)), abs=1e-12)
    p = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = build_optimizer([p], cfg.optimizer)
    value, velocity = 1.0, 0.0
    for grad in (0.5, -2.0, 1.0):  # plain momentum: v = 0.9 v + g + wd p; p -= lr v
        p.grad = torch.tensor([grad])
        optimizer.step()
        velocity = 0.9 * velocity + grad + 1e-4 * value
        value -= 1e-3 * velocity
        assert float(p.detach()) == pytest.approx(value, abs=1e-7)
    assert build_optimizer([p], Optimizer(name="sgd")).param_groups[0]["nesterov"] is True  # today's default
