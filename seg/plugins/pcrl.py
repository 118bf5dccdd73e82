"""SSL task ``pcrl``: Preservational Contrastive Representation Learning (Zhou et al., ICCV 2021).

Follows the official 3D code (Luchixiang/PCRL, ``pytorch/pcrl_3d.py`` and ``models/pcrl_model_3d.py``) step
by step; every default is the official value but for the deviations below. One training step on a batch of patches (B, 1, D, H, W):

1. Views: two overlapping crops per patch, resized to ``crop_size``, each flipped left-right and turned and
   zoomed at random on its own draw as the official loader does (torchio ``RandomFlip()`` + ``RandomAffine()``:
   +-10 degrees, zoom 0.9-1.1; ``view_*`` options): ``clean1``, ``clean2``. Corruptions (Gaussian blur, then
   in- or outpainting) make the inputs of the ordinary encoder (the backbone's, trained by gradient) and of
   the momentum encoder (its EMA). Random flips/quarter turns of the clean views are the reconstruction
   targets ``T1(clean1)``, ``T2(clean2)``; their 7-vector codes condition the decoder through a channel
   attention on the deepest features (``TransformAttention``: sigmoid(MLP(code)), official ``aug_fc1``/``aug_fc2``).
2. Cross-mixup ("hybrid") encoder, as in the official code: the feature maps of every level of the ordinary
   and momentum encoders mixed as ``a * f_o + (1 - a) * f_m`` with a ~ Beta(1, 1) folded to >= 0.5; the
   shared decoder reconstructs ``a * T1(clean1) + (1 - a) * T2(clean2)`` from them.
3. Input mixup: both inputs mixed with a permutation of the batch (lambda as above); the ordinary encoder
   and the hybrid reconstruct the equally mixed clean (untransformed) views, without conditioning.
4. Losses: MSE = mean of the 4 reconstructions; contrastive = mean of 3 InfoNCE terms (query/key, mixed
   query/mixed key, mixed query/mixup of the keys) against the queue; total = contrastive + MSE (official
   weights 1, 1).
5. Batch norm: ``bn_groups`` emulates the official 4 GPUs in one process (``seg.plugins.moco``).

Deviations, each documented in docs/pcrl.md with the option that restores the official behaviour where one does:

- reconstruction targets are the *clean* views, as the papers describe; ``targets = "official"`` restores the
  official code's: the flipped/turned *corrupted* input for the plain and hybrid reconstructions, and the
  mixup of the crops before flip, affine and corruption for the two mixup reconstructions;
- all three contrastive terms read the queue as it was before the step and the three key sets enter it
  after the optimizer step; ``enqueue = "between_terms"`` restores the official order (each term's keys enter
  right after the term, so the later terms of the step see them as negatives);
- InfoNCE (the paper's loss, as in MoCo) instead of the official code's NCE criterion, whose noise
  distribution is set from the number of batches per epoch and whose normalisation constant is fixed on the
  first batch: no option;
- no sigmoid on the reconstruction, since our patches are z-scored rather than scaled to [0, 1]; local pixel
  shuffling of the official loader is left out (the FLARE paper lists crop, flip, rotation, in/outpainting
  and blur): no option.

The momentum encoder's parameters follow the ordinary ones (m = 0.999, initial copy); its batch norms keep
their own running statistics and use shuffle-BN (see ``seg.plugins.moco``).

Backbone: the pretraining stage builds it with one output channel (the reconstructed image); fine-tuning
loads the encoder and every decoder tensor whose shape matches (all but the final 1x1 convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import seg
from seg.core.errors import ConfigError
from seg.plugins.moco import ENQUEUE, MomentumContrast, check_non_negative, check_positive
from seg.plugins.ssl_transforms import (OFFICIAL_CROP_SCALES, TRANSFORM_CODE_SIZE, Augmentation, batch_mixup,
                                        check_batch, mix, sample_mixup_lambda)


#: reconstruction targets: the clean views (the papers') or the official code's (module doc)
TARGETS = ("clean", "official")


class TransformAttention(nn.Module):
    """Channel weights sigmoid(Linear(ReLU(Linear(code)))) on the deepest feature map (official aug_fc1/2)."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(TRANSFORM_CODE_SIZE, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, features: list[torch.Tensor], codes: torch.Tensor) -> list[torch.Tensor]:
        """``features`` with the deepest map scaled channel-wise by the weights of ``codes`` (B, 7)."""
        deepest = features[-1]
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(codes.to(deepest.dtype)))))
        return [*features[:-1], deepest * weights.reshape(*weights.shape, *(1,) * (deepest.dim() - 2))]


class PCRL(MomentumContrast):
    """PCRL pretraining: MoCo contrast plus reconstruction from ordinary, momentum and hybrid encoders."""

    task_name = "pcrl"

    def __init__(self, backbone: nn.Module, *, queue_size: int = 16384, temperature: float = 0.2,
                 momentum: float = 0.999, projection_dim: int = 128, crop_size=(32, 64, 64),
                 crop_scales=OFFICIAL_CROP_SCALES, min_crop_iou: float = 0.25, flip_rate: float = 0.5,
                 blur_rate: float = 1.0, blur_sigma=(0.0, 2.0), paint_rate: float = 0.9, inpaint_rate: float = 0.2,
                 view_flip_rate: float = 0.5, view_rotation: float = 10.0, view_scale=(0.9, 1.1),
                 mixup_alpha: float = 1.0, contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0,
                 bn_groups: int = 4, enqueue: str = ENQUEUE[0], targets: str = "clean"):
        super().__init__(backbone, queue_size=queue_size, temperature=temperature, momentum=momentum,
                         projection_dim=projection_dim, bn_groups=bn_groups, enqueue=enqueue)
        self.augmentation = Augmentation.checked(
            self.task_name, crop_size=crop_size, crop_scales=crop_scales, min_crop_iou=min_crop_iou,
            flip_rate=flip_rate, blur_rate=blur_rate, blur_sigma=blur_sigma, paint_rate=paint_rate,
            inpaint_rate=inpaint_rate, view_flip_rate=view_flip_rate, view_rotation=view_rotation,
            view_scale=view_scale)
        if targets not in TARGETS:
            raise ConfigError(f"ssl task 'pcrl': option targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        self.targets = targets
        check_positive(self.task_name, mixup_alpha=mixup_alpha)
        check_non_negative(self.task_name, contrastive_weight=contrastive_weight,
                           reconstruction_weight=reconstruction_weight)
        if self.output_channels != 1:
            raise ConfigError(f"ssl task 'pcrl' reconstructs the image: the backbone must have 1 output channel, "
                              f"it has {self.output_channels}")
        self.mixup_alpha = float(mixup_alpha)
        self.contrastive_weight = float(contrastive_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.transform_attention = TransformAttention(self.deepest_channels)

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics (loss, mse, contrastive, contrastive_acc) of one PCRL step (module docstring)."""
        check_batch(self.task_name, batch)
        aug = self.augmentation
        with torch.no_grad(), torch.autocast(batch.device.type, enabled=False):
            crop1, crop2 = aug.views(batch.float())
            clean1, clean2 = aug.augment_views(crop1, crop2)
            input1, input2 = aug.corrupt(clean1, clean2)
            official = self.targets == "official"  # the official code's targets (module doc)
            target1, code1 = aug.flip_rotate(input1 if official else clean1)
            target2, code2 = aug.flip_rotate(input2 if official else clean2)
            plain1, plain2 = (crop1, crop2) if official else (clean1, clean2)
            hybrid, mixed_hybrid = sample_mixup_lambda(self.mixup_alpha), sample_mixup_lambda(self.mixup_alpha)
            lam = sample_mixup_lambda(self.mixup_alpha)
            order = torch.randperm(batch.shape[0]).to(batch.device)
            mixed_input1, mixed_input2 = batch_mixup(input1, lam, order), batch_mixup(input2, lam, order)
            mixed_clean1, mixed_clean2 = batch_mixup(plain1, lam, order), batch_mixup(plain2, lam, order)

        key_features, k = self.key(input2)
        mixed_key_features, mixed_k = self.key(mixed_input2)
        keys_mixed = batch_mixup(k, lam, order)
        features, q = self.query(input1)
        mixed_features, mixed_q = self.query(mixed_input1)

        decode = self.backbone.decode
        attended = self.transform_attention(features, code1)
        attended_key = self.transform_attention(key_features, code2)
        reconstructions = [
            (decode(attended), target1),
            (decode(mix(attended, attended_key, hybrid)), mix(target1, target2, hybrid)),
            (decode(mixed_features), mixed_clean1),
            (decode(mix(mixed_features, mixed_key_features, mixed_hybrid)),
             mix(mixed_clean1, mixed_clean2, mixed_hybrid)),
        ]
        mse = sum(F.mse_loss(out.float(), target) for out, target in reconstructions) / len(reconstructions)
        (loss_k, accuracy), (loss_mixed, _), (loss_cross, _) = (
            self.contrast(q, k), self.contrast(mixed_q, mixed_k), self.contrast(mixed_q, keys_mixed))
        contrastive = (loss_k + loss_mixed + loss_cross) / 3
        loss = self.contrastive_weight * contrastive + self.reconstruction_weight * mse
        self.remember_keys(k, mixed_k, keys_mixed)
        return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()),
                      "contrastive": float(contrastive.detach()), "contrastive_acc": float(accuracy)}


@seg.hookimpl
def register_ssl_tasks(register):
    """Register ``pcrl``."""
    register("pcrl", PCRL)
