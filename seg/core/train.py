"""The one training loop shared by pretraining and fine-tuning.

The stage supplies ``compute_loss() -> (loss, metrics)`` for one batch; the loop owns the optimizer step,
the scheduler, per-epoch metrics files, atomic checkpoints and exact resume: a checkpoint holds the module,
optimizer, scheduler, scaler, epoch and every RNG state, so a run resumed from it ends with the same weights
as one that never stopped (on CPU with a fixed seed).

Precision (the stage's ``precision``, :func:`training_precision`): on CUDA ``compute_loss`` runs under
autocast at fp16 with a gradient scaler (``auto``) or at bf16 (no scaler: bfloat16 has float32's range;
fp16 where the GPU lacks bfloat16). On the CPU training is always fp32: torch's CPU bfloat16 ``conv3d``
weight gradient (torch 2.13, oneDNN 3.12) is wrong at small spatial sizes, by up to 1e20 times the gradient
and differently on identical calls (``benchmarks/bf16_grad_check.py``); the study V-Net's deepest level hits
it: 5 of 7 fine-tuning tries of 150 steps or more turned NaN within 170 steps. Weights, gradients and optimizer
state stay float32 throughout. A stage keeps the work that must stay exact out of autocast
(:func:`full_precision`): fine-tuning's augmentation and loss.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from seg.core import distributed
from seg.core.averaging import WeightAverage
from seg.core.checkpoint import load_checkpoint, save_checkpoint
from seg.core.config import Optimizer
from seg.core.console import info, progress_bar
from seg.core.errors import CheckpointError, SegError
from seg.core.inference import PRECISIONS, autocast_context, resolve_precision
from seg.core.io import OutputError, write_text
from seg.core.loader import Prefetcher
from seg.core.schedules import build_scheduler

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, numpy and torch; return the numpy generator the stage samples patches with."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def rng_state(generator: np.random.Generator) -> dict:
    """Every random state a run depends on, as checkpoint-safe plain data."""
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(generator.bit_generator.state),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: np.random.Generator) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    torch.set_rng_state(state["torch"])
    generator.bit_generator.state = json.loads(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(parameters, cfg: Optimizer) -> torch.optim.Optimizer:
    """The configured optimizer over ``parameters``."""
    if cfg.name == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def training_precision(precision: str, device: torch.device) -> str:
    """The precision a training stage runs at on ``device`` for a requested ``auto|fp32|fp16|bf16`` (module
    docstring: fp32 on the CPU whatever is asked, saying so when it was fp16 or bf16)."""
    if torch.device(device).type == "cuda":
        return resolve_precision(precision, device)
    resolve_precision(precision, device)  # the same one-line error for a value that is none of these
    if precision in ("fp16", "bf16"):
        info(f"precision {precision}: training on the CPU runs at fp32 (torch's CPU bfloat16 conv3d weight "
             "gradients are wrong; seg.core.train)")
    return "fp32"


def full_precision(device: torch.device):
    """A context inside ``compute_loss`` that runs at float32 whatever the loop's precision (autocast off):
    augmentation (a bfloat16 sampling grid is off by up to half a voxel at 64 voxels) and losses. Cast the
    network's output with ``.float()`` on entering it."""
    return torch.autocast(torch.device(device).type, enabled=False)


def stage_loop(cfg, *, cases: int, run_dir: Path, module: torch.nn.Module, optimizer, device: torch.device,
               generator: np.random.Generator, meta: dict, epochs: int | None = None,
               average: WeightAverage | None = None) -> "TrainingLoop":
    """The loop for a stage config (``Pretrain`` or ``Finetune``): its scheduler, epochs and precision
    (``auto`` where the stage has none), and by default one pass over ``cases`` per epoch across all ranks
    (``steps_per_epoch`` overrides); ``average``, if any, follows the module's weights."""
    steps = cfg.steps_per_epoch or max(1, cases // (cfg.batch_size * distributed.world_size()))
    epochs = cfg.epochs if epochs is None else epochs
    return TrainingLoop(run_dir=Path(run_dir), module=module, optimizer=optimizer,
                        scheduler=build_scheduler(optimizer, cfg.scheduler, epochs), device=device,
                        epochs=epochs, steps_per_epoch=steps,
                        generator=generator, meta=meta, checkpoint_every=cfg.checkpoint_every,
                        precision=training_precision(getattr(cfg, "precision", "auto"), device), average=average)


class NonFiniteLoss(SegError):
    """The loss became NaN or infinite; training stops rather than writing garbage."""

    exit_code = 1


class TrainingLoop:
    """Epochs of ``steps_per_epoch`` optimizer steps, with checkpoints in ``run_dir``.

    ``module`` is what gets checkpointed (the network, or the SSL task that owns it); ``meta`` is plain data
    stored in every checkpoint (resolved config, backbone description, labels); ``precision``: ``fp32``,
    ``fp16`` or ``bf16`` is run as given, ``auto`` resolves by :func:`training_precision`. With an
    ``average`` (``seg.core.averaging``), it is updated after every optimizer step and a checkpoint's
    ``model`` holds the averaged weights (what inference loads), ``training_model`` the module's own.
    """

    def __init__(self, *, run_dir: Path, module: torch.nn.Module, optimizer, scheduler, device: torch.device,
                 epochs: int, steps_per_epoch: int, generator: np.random.Generator, meta: dict,
                 checkpoint_every: int = 1, precision: str = "auto", average: WeightAverage | None = None):
        self.run_dir = Path(run_dir)
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.precision = precision if precision in PRECISIONS else training_precision(precision, device)
        self.amp = self.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.generator = generator
        self.meta = meta
        self.checkpoint_every = max(1, checkpoint_every)
        self.average = average
        self.epoch = 0
        self.history: list[dict] = []

    def state(self) -> dict:
        """The full checkpoint payload."""
        module = getattr(self.module, "module", self.module)  # unwrap DistributedDataParallel
        weights = {"model": module.state_dict()}
        if self.average is not None:
            weights = {"model": self.average.state_dict(), "training_model": weights["model"],
                       "average_updates": self.average.updates}
        return {
            **self.meta,
            **weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "rng": distributed.gather_objects(rng_state(self.generator)),
            "history": json.dumps(self.history),
        }

    def save(self, name: str = LATEST) -> None:
        """Write a checkpoint atomically: every rank takes part (RNG states are gathered), rank 0 writes."""
        state = self.state()
        if distributed.is_main():
            try:
                save_checkpoint(state, self.run_dir / name)
            except RuntimeError as exc:  # torch.save reports a full disk so; the OSError is its context
                if not isinstance(exc.__context__, OSError):
                    raise
                raise OutputError(f"{self.run_dir / name}: cannot write ({exc.__context__.strerror})") from None

    def resume(self, path: Path | None = None) -> None:
        """Continue from ``path`` (default: this run's latest checkpoint) exactly where it stopped."""
        path = Path(path) if path else self.run_dir / LATEST
        state = load_checkpoint(path)
        if state.get("kind") != self.meta.get("kind"):
            raise CheckpointError(f"{path}: a {state.get('kind')} checkpoint; cannot resume a {self.meta.get('kind')} run")
        module = getattr(self.module, "module", self.module)
        try:
            module.load_state_dict(state.get("training_model", state["model"]))
            if self.average is not None:
                self.average.load_state_dict(state["model"])
                self.average.updates = int(state.get("average_updates", 0))
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without AMP (a CPU run resumed on CUDA starts a fresh scale)
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        rngs = state["rng"]
        if len(rngs) != distributed.world_size():
            raise CheckpointError(f"{path}: saved by {len(rngs)} process(es), resumed with {distributed.world_size()}")
        set_rng_state(rngs[distributed.rank()], self.generator)
        info(f"resumed from {path} at epoch {self.epoch}")

    def _write_metrics(self) -> None:
        if not distributed.is_main() or not self.history:
            return
        write_text(json.dumps(self.history, indent=1), self.run_dir / "metrics.json")
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        write_text(buffer.getvalue(), self.run_dir / "metrics.csv")
        from seg.core import dashboard  # TensorBoard events and progress.png, each where its package is installed

        dashboard.update(self.run_dir, self.history, self.meta.get("labels"))

    def run(self, compute_loss: Callable[..., tuple[torch.Tensor, dict]],
            after_step: Callable[[], None] | None = None,
            on_epoch_end: Callable[[int], dict | None] | None = None, description: str = "training",
            batches: Callable[[], Any] | None = None) -> None:
        """Train from the current epoch to ``self.epochs``.

        With ``batches``, each step's batch is made by ``batches()`` in a background thread while the step
        before computes (``seg.core.loader``), and ``compute_loss(batch)`` gets it; without, ``compute_loss()``
        makes its own. Each epoch's record holds ``train_cpu_s`` and ``train_wall_s`` (the run's process CPU
        and wall seconds spent in training steps so far, validation excluded: time to accuracy) and
        ``data_wait`` (the share of the epoch's step time spent waiting for a batch)."""
        if self.epoch == 0 and not (self.run_dir / LATEST).exists():
            self.save()  # an initialised checkpoint: `--epochs 0` yields a usable model
        total = (self.epochs - self.epoch) * self.steps_per_epoch
        spent = self.history[-1] if self.history else {}
        cpu_total, wall_total = spent.get("train_cpu_s", 0.0), spent.get("train_wall_s", 0.0)
        with progress_bar(description, total) as advance:
            while self.epoch < self.epochs:
                sums: dict[str, float] = defaultdict(float)
                self.module.train()
                lr = self.optimizer.param_groups[0]["lr"]
                cpu, wall = time.process_time(), time.perf_counter()
                with contextlib.ExitStack() as stack:
                    source = stack.enter_context(Prefetcher(batches, self.steps_per_epoch)) if batches else None
                    for _ in range(self.steps_per_epoch):
                        self.optimizer.zero_grad(set_to_none=True)
                        with autocast_context(self.device, self.precision):
                            loss, metrics = compute_loss(source.next()) if source else compute_loss()
                        if not torch.isfinite(loss):
                            raise NonFiniteLoss(f"{self.run_dir}: loss became {loss.item()} at epoch "
                                                f"{self.epoch + 1}; lower the learning rate or check the data")
                        self.scaler.scale(loss).backward()
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        if self.average is not None:
                            self.average.update(self.module)
                        if after_step is not None:
                            after_step()
                        for key, value in {"loss": loss.item(), **metrics}.items():
                            sums[key] += float(value)
                        advance(1, epoch=self.epoch + 1, loss=loss.item())
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                cpu_total, wall_total = cpu_total + cpu, wall_total + wall
                self.scheduler.step()
                self.epoch += 1
                record = {"epoch": self.epoch, "lr": lr}
                record.update({k: v / max(1, self.steps_per_epoch) for k, v in sums.items()})
                record.update({"train_cpu_s": round(cpu_total, 3), "train_wall_s": round(wall_total, 3),
                               "data_wait": round(source.waited / wall, 4) if source else 0.0})
                if on_epoch_end is not None:
                    record.update(on_epoch_end(self.epoch) or {})
                self.history.append(record)
                self._write_metrics()
                if self.epoch % self.checkpoint_every == 0 or self.epoch == self.epochs:
                    self.save()
