"""SSL task ``pcrl``: Preservational Contrastive Representation Learning (Zhou et al., ICCV 2021).

Follows the official 3D code (Luchixiang/PCRL, ``pytorch/pcrl_3d.py`` and ``models/pcrl_model_3d.py``) step
by step; every default is the official value. One training step on a batch of patches (B, 1, D, H, W):

1. Views: two overlapping crops per patch, resized to ``crop_size`` (``clean1``, ``clean2``). Corruptions
   (Gaussian blur, then in- or outpainting) make the inputs of the ordinary encoder (the backbone's, trained
   by gradient) and of the momentum encoder (its EMA). Random flips/quarter turns of the clean views are the
   reconstruction targets ``T1(clean1)``, ``T2(clean2)``; their 7-vector codes condition the decoder through
   a channel attention on the deepest features (``TransformAttention``: sigmoid(MLP(code)), official
   ``aug_fc1``/``aug_fc2``).
2. Cross-mixup ("hybrid") encoder, as in the official code: the feature maps of every level of the ordinary
   and momentum encoders mixed as ``a * f_o + (1 - a) * f_m`` with a ~ Beta(1, 1) folded to >= 0.5; the
   shared decoder reconstructs ``a * T1(clean1) + (1 - a) * T2(clean2)`` from them.
3. Input mixup: both inputs mixed with a permutation of the batch (lambda as above); the ordinary encoder
   and the hybrid reconstruct the equally mixed clean (untransformed) views, without conditioning.
4. Losses: MSE = mean of the 4 reconstructions; contrastive = mean of 3 InfoNCE terms (query/key, mixed
   query/mixed key, mixed query/mixup of the keys) against the queue; total = contrastive + MSE (official
   weights 1, 1). The 3 key sets enter the queue after the step, as in the official code.

Deviations, on purpose: InfoNCE (the paper's loss, as in MoCo) instead of the official code's NCE criterion
with a normalisation constant; all three terms read the queue as it was before the step (the official code
enqueues between the terms); reconstruction targets are the *clean* transformed views, as the papers describe
(the official code's first target flips the corrupted input); no sigmoid on the reconstruction, since our
patches are z-scored rather than scaled to [0, 1]; local pixel shuffling and torchio's random affine of the
official data loader are left out (the FLARE paper lists crop, flip, rotation, in/outpainting and blur).
The momentum encoder's parameters follow the ordinary ones (m = 0.999, initial copy); its batch norms keep
their own running statistics and use shuffle-BN under DDP (see ``seg.plugins.moco``).

Backbone: the pretraining stage builds it with one output channel (the reconstructed image); fine-tuning
loads the encoder and every decoder tensor whose shape matches (all but the final 1x1 convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import seg
from seg.core.errors import ConfigError
from seg.plugins.moco import MomentumContrast, check_non_negative, check_positive
from seg.plugins.ssl_transforms import (OFFICIAL_CROP_SCALES, TRANSFORM_CODE_SIZE, Augmentation, batch_mixup,
                                        check_batch, mix, sample_mixup_lambda)


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
                 mixup_alpha: float = 1.0, contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0):
        super().__init__(backbone, queue_size=queue_size, temperature=temperature, momentum=momentum,
                         projection_dim=projection_dim)
        self.augmentation = Augmentation.checked(
            self.task_name, crop_size=crop_size, crop_scales=crop_scales, min_crop_iou=min_crop_iou,
            flip_rate=flip_rate, blur_rate=blur_rate, blur_sigma=blur_sigma, paint_rate=paint_rate,
            inpaint_rate=inpaint_rate)
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
            clean1, clean2 = aug.views(batch.float())
            input1, input2 = aug.corrupt(clean1, clean2)
            target1, code1 = aug.flip_rotate(clean1)
            target2, code2 = aug.flip_rotate(clean2)
            hybrid, mixed_hybrid = sample_mixup_lambda(self.mixup_alpha), sample_mixup_lambda(self.mixup_alpha)
            lam = sample_mixup_lambda(self.mixup_alpha)
            order = torch.randperm(batch.shape[0]).to(batch.device)
            mixed_input1, mixed_input2 = batch_mixup(input1, lam, order), batch_mixup(input2, lam, order)
            mixed_clean1, mixed_clean2 = batch_mixup(clean1, lam, order), batch_mixup(clean2, lam, order)

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
