"""The shared training loop: atomic checkpoints, safe loading, exact resume, metrics files."""

import json
import pickle
import time

import numpy as np
import pytest
import torch

from seg.core.checkpoint import load_checkpoint, save_checkpoint
from seg.core.config import Optimizer, Scheduler
from seg.core.errors import CheckpointError
from seg.core.schedules import build_scheduler
from seg.core.train import LATEST, NonFiniteLoss, TrainingLoop, build_optimizer, seed_everything


class Crash(Exception):
    pass


def make_loop(run_dir, epochs=4, crash_at=None):
    generator = seed_everything(7)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = build_optimizer(model.parameters(), Optimizer(lr=1e-2))
    scheduler = build_scheduler(optimizer, Scheduler([2, 3], 0.5), epochs)
    loop = TrainingLoop(run_dir=run_dir, module=model, optimizer=optimizer, scheduler=scheduler,
                        device=torch.device("cpu"), epochs=epochs, steps_per_epoch=3, generator=generator,
                        meta={"kind": "test"})
    steps = {"n": 0}

    def compute_loss():
        steps["n"] += 1
        if crash_at is not None and steps["n"] == crash_at:
            raise Crash()
        x = torch.from_numpy(generator.normal(size=(5, 3)).astype(np.float32))
        y = x.sum(1, keepdim=True) + torch.randn(5, 1)  # torch RNG too
        return torch.nn.functional.mse_loss(model(x), y), {"extra": 1.0}

    return loop, model, compute_loss


def test_resume_after_crash_gives_the_same_weights(tmp_path):
    loop, model, step = make_loop(tmp_path / "a")
    loop.run(step)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    loop, model, step = make_loop(tmp_path / "b", crash_at=8)  # mid-epoch 3: last checkpoint is epoch 2
    with pytest.raises(Crash):
        loop.run(step)
    assert load_checkpoint(tmp_path / "b" / LATEST)["epoch"] == 2

    loop, model, step = make_loop(tmp_path / "b")
    seed_everything(12345)  # the resumed process starts from a different RNG state
    loop.resume()
    loop.run(step)
    for key, value in model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key
    history = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["lr"] for r in history] == pytest.approx([1e-2, 1e-2, 5e-3, 2.5e-3])  # the lr each epoch trained with
    assert (tmp_path / "b" / "metrics.csv").read_text().startswith("epoch,lr,loss,extra")


def test_zero_epochs_writes_an_initialised_checkpoint(tmp_path):
    loop, model, step = make_loop(tmp_path, epochs=0)
    loop.run(step)
    state = load_checkpoint(tmp_path / LATEST)
    assert state["epoch"] == 0 and torch.equal(state["model"]["0.weight"], model[0].weight)


def test_non_finite_loss_stops_training(tmp_path):
    loop, model, _ = make_loop(tmp_path)
    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 1"):
        loop.run(lambda: (model(torch.ones(1, 3)).sum() * float("nan"), {}))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_code_carrying_checkpoint_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused to load"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="c.pt: truncated or not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_time_to_accuracy_columns_accumulate_across_a_resume(tmp_path):
    """train_cpu_s / train_wall_s are running totals of training-step time (a resumed run continues them) and
    data_wait is the share of an epoch's step time spent waiting for prefetched batches."""
    loop, model, step = make_loop(tmp_path, epochs=2)
    loop.run(step)
    first = json.loads((tmp_path / "metrics.json").read_text())
    loop, model, _ = make_loop(tmp_path, epochs=4)
    loop.resume()

    def slow_batch():
        time.sleep(0.02)
        return torch.ones(5, 3)

    loop.run(lambda batch: (model(batch).pow(2).mean(), {}), batches=slow_batch)
    history = json.loads((tmp_path / "metrics.json").read_text())
    cpu = [r["train_cpu_s"] for r in history]
    wall = [r["train_wall_s"] for r in history]
    assert cpu[:2] == [r["train_cpu_s"] for r in first] and cpu == sorted(cpu) and wall == sorted(wall)
    assert wall[3] - wall[2] >= 3 * 0.02 * 0.9  # three steps, each waiting for its batch
    assert [r["data_wait"] for r in history[:2]] == [0.0, 0.0]
    assert all(0.3 < r["data_wait"] <= 1.0 for r in history[2:])  # the steps are cheap: mostly waiting
