"""Learning-rate schedules: a factor on the optimizer's learning rate, a pure function of the epoch.

Every schedule is ``factor(epoch)`` for ``epoch`` = the number of completed epochs (0 during the first), so
it is tested against its formula and resumes exactly (``LambdaLR`` stores only the epoch count):

- ``multistep`` (the paper's): ``gamma ** (number of milestones <= epoch)``, as ``torch``'s ``MultiStepLR``;
- ``poly`` (nnU-Net's, ``power`` 0.9): ``(1 - t) ** power``;
- ``cosine``: ``min_factor + (1 - min_factor) * (1 + cos(pi t)) / 2``;
- ``constant``: 1.

``t = (epoch - warmup_epochs) / (epochs - warmup_epochs)`` is the share of the decay done. A linear warm-up
of ``warmup_epochs`` multiplies any schedule by ``(epoch + 1) / warmup_epochs`` while ``epoch < warmup_epochs``.
"""

from __future__ import annotations

import bisect
import math

import torch

from seg.core.config import Scheduler


def lr_factor(cfg: Scheduler, epoch: int, epochs: int) -> float:
    """The factor on the base learning rate during epoch ``epoch + 1`` of ``epochs``."""
    if cfg.name == "multistep":
        factor = cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), epoch)
    elif cfg.name == "constant":
        factor = 1.0
    else:
        span = max(1, epochs - cfg.warmup_epochs)
        t = min(1.0, max(0.0, (epoch - cfg.warmup_epochs) / span))
        if cfg.name == "poly":
            factor = (1.0 - t) ** cfg.power
        else:
            factor = cfg.min_factor + (1.0 - cfg.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if epoch < cfg.warmup_epochs:
        factor *= (epoch + 1) / cfg.warmup_epochs
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Scheduler, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s schedule over ``epochs`` epochs, stepped once per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch, epochs))
