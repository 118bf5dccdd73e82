"""The backbone protocol that SSL pretext tasks rely on, in one place.

A backbone is any ``torch.nn.Module`` mapping (B, in, D, H, W) to (B, out, D, H, W). One that can be
pretrained also splits into an encoder and a decoder:

- ``encode(x) -> list[Tensor]``: the feature maps of every resolution level, finest first; the last
  one is the deepest (bottleneck) feature map that contrastive losses pool.
- ``decode(features) -> Tensor``: the output logits from such a list (skips included).
- ``encoder_modules() -> list[str]``: the names (``named_children`` keys) of the submodules that make up the
  encoder; everything else belongs to the decoder. SSL tasks copy these for momentum encoders, and
  ``finetune --init`` reports what it loaded per part.
- ``forward(x) == decode(encode(x))``.

Any backbone may also offer ``for_inference() -> Module``: the same function in eval mode, rearranged for speed
(e.g. batch norms folded into convolutions). ``seg predict`` calls it after loading the weights; the result is
never trained or saved.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from seg.core.errors import ConfigError


@runtime_checkable
class EncoderDecoder(Protocol):
    """A backbone an SSL task can pretrain (see the module docstring)."""

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every resolution level, finest first, deepest last."""

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Output logits from the list ``encode`` returned."""

    def encoder_modules(self) -> list[str]:
        """Names of the child modules that make up the encoder."""


def encode_levels(name: str, stages, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Run ``x`` through the encoder ``stages``, keeping every level's output (finest first).

    Refuses, naming the backbone, an input whose D, H, W are not multiples of ``2 ** (depth - 1)``.
    """
    multiple = 2 ** (depth - 1)
    if x.ndim != 5 or any(s % multiple for s in x.shape[2:]):
        raise ConfigError(f"{name}: input of shape {tuple(x.shape)} must be (B, C, D, H, W) with D, H, W "
                          f"divisible by {multiple} (2 ** (depth - 1), depth={depth}); "
                          f"choose patch and window sizes that are multiples of {multiple}")
    features = []
    for stage in stages:
        x = stage(x)
        features.append(x)
    return features


def is_encoder_key(backbone: EncoderDecoder, state_key: str) -> bool:
    """Whether a ``state_dict`` key of ``backbone`` belongs to its encoder."""
    return state_key.split(".", 1)[0] in set(backbone.encoder_modules())


def count_parameters(module: torch.nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
