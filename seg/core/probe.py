"""The pretraining probe: is the representation becoming useful while pretraining runs?

Every ``pretrain.probe_every`` epochs (and after the last), a copy of the backbone being pretrained is
fine-tuned for ``pretrain.probe_steps`` steps on the labeled cases, exactly as ``seg run finetune`` would
train it (the experiment's ``finetune`` loss, optimizer at its base learning rate, patches, batch size and
augmentations; ``finetune.cases`` and the same train/validation split), then scored on the validation cases
through the experiment's inferer; the mean Dice is logged as ``probe_dice`` in the run's metrics. Loss curves
say whether the pretext task is being learned, this says whether that helps segmentation.

The probe draws from its own generators (seeded by the experiment's seed and the epoch) inside a forked torch
RNG, so pretraining, and its exact resume, are the same with or without it. Under torchrun every rank runs
the same probe (no collective communication; rank 0's metrics are written).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seg.core import plugins
from seg.core.augment import augment_batch
from seg.core.config import Experiment
from seg.core.data import labeled_cases
from seg.core.errors import DataError
from seg.core.finetune import training_and_validation, validate
from seg.core.model import build_backbone
from seg.core.patches import LabeledPatches
from seg.core.train import build_optimizer


class Probe:
    """``probe(epoch)`` -> ``{"probe_dice": mean validation Dice}`` on probing epochs, else None (module doc)."""

    def __init__(self, exp: Experiment, data: Path, device: torch.device, backbone: torch.nn.Module, epochs: int,
                 workers: int = 1):
        self.exp, self.device, self.backbone, self.epochs = exp, device, backbone, epochs
        self.every, self.steps = exp.pretrain.probe_every, exp.pretrain.probe_steps
        cfg = exp.finetune
        try:
            dataset, cases = labeled_cases(Path(data), exp, workers)
        except DataError as exc:
            raise DataError(f"pretrain.probe_every: the probe fine-tunes on labeled cases; {exc}") from None
        self.train, self.val = training_and_validation(cases, cfg, data, exp.seed)
        self.num_classes = dataset.num_classes
        self.loss = plugins.get("losses", cfg.loss.name)(self.num_classes, **cfg.loss.options)
        self.inferer = plugins.get("inferers", exp.predict.inferer.name)(**exp.predict.inferer.options)

    @classmethod
    def for_stage(cls, exp: Experiment, data: Path, device: torch.device, backbone: torch.nn.Module, epochs: int,
                  workers: int = 1) -> "Probe | None":
        """The probe of a pretraining run, or None when ``pretrain.probe_every`` is 0 (off)."""
        return cls(exp, data, device, backbone, epochs, workers) if exp.pretrain.probe_every else None

    def __call__(self, epoch: int) -> dict[str, float] | None:
        """The probe's record at the end of ``epoch`` (a multiple of ``probe_every``, or the last), else None."""
        if epoch % self.every and epoch != self.epochs:
            return None
        return {"probe_dice": self.score(epoch)}

    def network(self) -> torch.nn.Module:
        """A fresh segmentation network holding every tensor of the pretrained backbone whose name and shape
        match (all but the output layer, as ``--init`` loads)."""
        network = build_backbone(self.exp.backbone, 1, self.num_classes)
        target = network.state_dict()
        source = {k: v for k, v in self.backbone.state_dict().items() if k in target and v.shape == target[k].shape}
        network.load_state_dict({**target, **{k: v.detach().clone() for k, v in source.items()}})
        return network.to(self.device)

    def score(self, epoch: int) -> float:
        """Fine-tune a copy of the backbone for ``probe_steps`` steps; its mean validation Dice."""
        cfg = self.exp.finetune
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.exp.seed * 1_000_003 + epoch)
            rng = np.random.default_rng([self.exp.seed, epoch])
            network = self.network()
            optimizer = build_optimizer(network.parameters(), cfg.optimizer)
            patches = LabeledPatches(self.train, cfg.patch_size, cfg.class_share, rng)
            network.train()
            for _ in range(self.steps):
                images, labels = patches.batch(cfg.batch_size)
                x, y = torch.from_numpy(images).to(self.device), torch.from_numpy(labels).to(self.device)
                x, y = augment_batch(x, y, cfg.augment, int(rng.integers(2**62)))
                optimizer.zero_grad(set_to_none=True)
                self.loss(network(x), y).backward()
                optimizer.step()
            scores = validate(network, self.val, self.inferer, self.device, self.num_classes)
        return float(np.mean(list(scores.values())))
