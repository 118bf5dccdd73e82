"""SSL task ``contrastive``: plain MoCo pretraining, the "contrastive learning only" side of the ablation.

The same encoder, projection head, momentum encoder, key queue, shuffle-BN (with ``bn_groups`` emulating
several devices in one process) and official defaults as ``pcrl`` (``seg.plugins.moco``), and the same view
augmentations as ``pcrl``'s encoders see (the official loader's: two overlapping crops per patch, each flipped
left-right and turned and zoomed at random on its own draw, then blurred and in/outpainted), with no
reconstruction: the decoder is never used, so no flips/quarter turns of reconstruction targets either.
InfoNCE matches the ordinary encoder's query of the first view with the momentum encoder's key of the second
against the queue.

Backbone: built like ``pcrl``'s (one output channel); fine-tuning loads its encoder (the decoder stays at
its initialisation).
"""

from __future__ import annotations

import torch
from torch import nn

import seg
from seg.plugins.moco import MomentumContrast
from seg.plugins.ssl_transforms import OFFICIAL_CROP_SCALES, Augmentation, check_batch


class Contrastive(MomentumContrast):
    """MoCo pretraining of the backbone's encoder: query/key InfoNCE against a queue, no reconstruction."""

    task_name = "contrastive"

    def __init__(self, backbone: nn.Module, *, queue_size: int = 16384, temperature: float = 0.2,
                 momentum: float = 0.999, projection_dim: int = 128, crop_size=(32, 64, 64),
                 crop_scales=OFFICIAL_CROP_SCALES, min_crop_iou: float = 0.25, blur_rate: float = 1.0,
                 blur_sigma=(0.0, 2.0), paint_rate: float = 0.9, inpaint_rate: float = 0.2,
                 view_flip_rate: float = 0.5, view_rotation: float = 10.0, view_scale=(0.9, 1.1), bn_groups: int = 4):
        super().__init__(backbone, queue_size=queue_size, temperature=temperature, momentum=momentum,
                         projection_dim=projection_dim, bn_groups=bn_groups)
        self.augmentation = Augmentation.checked(
            self.task_name, crop_size=crop_size, crop_scales=crop_scales, min_crop_iou=min_crop_iou,
            blur_rate=blur_rate, blur_sigma=blur_sigma, paint_rate=paint_rate, inpaint_rate=inpaint_rate,
            view_flip_rate=view_flip_rate, view_rotation=view_rotation, view_scale=view_scale)

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """InfoNCE loss and metrics (loss, contrastive, contrastive_acc) of one MoCo step."""
        check_batch(self.task_name, batch)
        aug = self.augmentation
        with torch.no_grad(), torch.autocast(batch.device.type, enabled=False):
            input1, input2 = aug.corrupt(*aug.augment_views(*aug.views(batch.float())))
        _, k = self.key(input2)
        _, q = self.query(input1)
        loss, accuracy = self.contrast(q, k)
        self.remember_keys(k)
        return loss, {"loss": float(loss.detach()), "contrastive": float(loss.detach()),
                      "contrastive_acc": float(accuracy)}


@seg.hookimpl
def register_ssl_tasks(register):
    """Register ``contrastive``."""
    register("contrastive", Contrastive)
