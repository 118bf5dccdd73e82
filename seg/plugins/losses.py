"""Supervised segmentation losses: ``gdice_ce`` (the paper's), ``dice_ce`` and ``ce``.

Every loss maps logits (B, C, D, H, W) and integer labels (B, D, H, W) to a scalar. Dice terms use
softmax probabilities ``p`` and are computed per sample and class (``batch=False``, as MONAI's default)
or over the whole batch as one volume (``batch=True``), from three sums per class: the probability on
the class's own voxels ``tp``, the total probability ``sum p`` and the class volume ``|y|``. These come
from a gather and a scatter-add over the labels, so no one-hot tensor is ever built.

- ``ce``: cross-entropy averaged over voxels.
- ``dice_ce``: ``dice_weight * (1 - mean_c (2 tp_c + s) / (sum p_c + |y_c| + s)) + ce_weight * ce``.
- ``gdice_ce``: generalized Dice (Sudre et al. 2017) plus cross-entropy, as in the paper:
  ``1 - (2 sum_c w_c tp_c + s) / (sum_c w_c (sum p_c + |y_c|) + s)`` with ``w_c = 1 / |y_c|^2``.
  A class absent from the sample (or batch) would get an infinite weight; it gets the largest weight
  of the present classes instead (MONAI's rule), so predicting an absent class is penalised as much as
  the rarest present one. With no class present at all every weight is 0 and the term is 0.

``s`` is ``smooth`` (default 1e-5, in numerator and denominator, as MONAI). ``include_background=False``
drops class 0 from the Dice term (never from the cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import seg
from seg.core.errors import ConfigError, DataError


class SegmentationLoss(nn.Module):
    """Shared checks and per-class sums; subclasses combine them in ``combine``."""

    name = "loss"

    def __init__(self, num_classes: int, *, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = True, batch: bool = False, smooth: float = 1e-5):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"{self.name}: num_classes must be at least 2, got {num_classes}")
        if dice_weight < 0 or ce_weight < 0 or smooth < 0:
            raise ConfigError(f"{self.name}: dice_weight, ce_weight and smooth must be >= 0")
        self.num_classes = num_classes
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.include_background, self.batch, self.smooth = include_background, batch, float(smooth)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of ``logits`` (B, C, ...) against integer ``labels`` (B, ...)."""
        if logits.shape[1] != self.num_classes or logits.shape[:1] + logits.shape[2:] != labels.shape:
            raise ConfigError(f"{self.name}: logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)} "
                              f"and num_classes={self.num_classes}")
        labels = labels.long()
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise DataError(f"{self.name}: label values {low}..{high} outside 0..{self.num_classes - 1} "
                            f"(num_classes={self.num_classes})")
        log_p = F.log_softmax(logits.float(), dim=1)
        ce = F.nll_loss(log_p, labels)
        if self.dice_weight == 0:
            return self.ce_weight * ce
        return self.dice_weight * self.dice(log_p.exp(), labels) + self.ce_weight * ce

    def class_sums(self, p: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tp``, ``sum p`` and ``|y|`` per (sample, class), or per class when ``batch``; background dropped
        unless ``include_background``."""
        b, c = p.shape[:2]
        p, index = p.reshape(b, c, -1), labels.reshape(b, 1, -1)
        own = p.gather(1, index)
        tp = torch.zeros(b, c, dtype=p.dtype, device=p.device).scatter_add(1, index[:, 0], own[:, 0])
        volume = torch.zeros(b, c, dtype=p.dtype, device=p.device).scatter_add_(
            1, index[:, 0], torch.ones_like(own[:, 0]))
        sums = (tp, p.sum(2), volume)
        if self.batch:
            sums = tuple(s.sum(0, keepdim=True) for s in sums)
        if not self.include_background:
            sums = tuple(s[:, 1:] for s in sums)
        return sums

    def dice(self, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The Dice term (0 = perfect)."""
        raise NotImplementedError


class CrossEntropy(SegmentationLoss):
    """``ce``: cross-entropy averaged over all voxels."""

    name = "ce"

    def __init__(self, num_classes: int):
        super().__init__(num_classes, dice_weight=0.0)


class DiceCE(SegmentationLoss):
    """``dice_ce``: soft Dice averaged over classes (and samples) plus cross-entropy."""

    name = "dice_ce"

    def dice(self, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tp, predicted, volume = self.class_sums(p, labels)
        return 1.0 - ((2.0 * tp + self.smooth) / (predicted + volume + self.smooth)).mean()


class GeneralizedDiceCE(SegmentationLoss):
    """``gdice_ce``: generalized Dice (weights 1/volume^2) plus cross-entropy, the paper's fine-tuning loss."""

    name = "gdice_ce"

    def dice(self, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tp, predicted, volume = self.class_sums(p, labels)
        present = volume > 0
        weight = torch.where(present, 1.0 / volume.clamp(min=1.0) ** 2, torch.zeros_like(volume))
        weight = torch.where(present, weight, weight.amax(1, keepdim=True))
        numerator = 2.0 * (weight * tp).sum(1) + self.smooth
        denominator = (weight * (predicted + volume)).sum(1) + self.smooth
        return (1.0 - numerator / denominator).mean()


@seg.hookimpl
def register_losses(register):
    """Register ``gdice_ce``, ``dice_ce`` and ``ce``."""
    register("gdice_ce", GeneralizedDiceCE)
    register("dice_ce", DiceCE)
    register("ce", CrossEntropy)
