"""The ``unet3d`` backbone: a compact residual 3D U-Net (an alternative to ``vnet``).

Resolution levels of widths ``base * 2**level`` (capped at ``max_channels``). Each level is a residual
block of two 3x3x3 convolutions (norm, LeakyReLU 0.01; a 1x1x1 projection on the shortcut when the
width changes). Going down, a 3x3x3 stride-2 convolution halves the resolution; going up, a 2x2x2
stride-2 transposed convolution doubles it and the level's skip is concatenated before the block. A
1x1x1 convolution gives the logits. Weights start "he" normal for LeakyReLU(0.01), biases at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import seg
from seg.core.backbone import encode_levels
from seg.core.errors import ConfigError

NORMS = ("instance", "batch", "none")
SLOPE = 0.01


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named ``norm`` ("instance", "batch" or "none")."""
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


def conv_norm_act(in_channels: int, out_channels: int, norm: str, stride: int = 1) -> nn.Sequential:
    """A 3x3x3 convolution, normalisation and LeakyReLU."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none"),
                         make_norm(norm, out_channels), nn.LeakyReLU(SLOPE, inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with a shortcut (a 1x1x1 projection when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.first = conv_norm_act(in_channels, out_channels, norm)
        self.second = nn.Sequential(nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=norm == "none"),
                                    make_norm(norm, out_channels))
        self.shortcut = nn.Identity() if in_channels == out_channels else \
            nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.act = nn.LeakyReLU(SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, ``out_channels`` wide, same resolution."""
        return self.act(self.second(self.first(x)) + self.shortcut(x))


class UNet3D(nn.Module):
    """Compact residual 3D U-Net; see the module docstring.

    Options: ``base_channels`` (width of the finest level), ``depth`` (resolution levels), ``norm``
    ("instance", "batch" or "none"), ``max_channels`` (width cap). Inputs need D, H, W divisible by
    ``2 ** (depth - 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, base_channels: int = 16, depth: int = 5,
                 norm: str = "instance", max_channels: int = 320):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"unet3d: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if depth < 2 or min(base_channels, max_channels, in_channels, out_channels) < 1:
            raise ConfigError(f"unet3d: need depth >= 2 and positive channel counts, got depth={depth}, "
                              f"base_channels={base_channels}, max_channels={max_channels}")
        self.depth = depth
        widths = [min(base_channels * 2**level, max_channels) for level in range(depth)]
        self.encoder = nn.ModuleList(
            [nn.Sequential(conv_norm_act(in_channels, widths[0], norm), ResidualBlock(widths[0], widths[0], norm))]
            + [nn.Sequential(conv_norm_act(widths[lv - 1], widths[lv], norm, stride=2),
                             ResidualBlock(widths[lv], widths[lv], norm)) for lv in range(1, depth)])
        levels = list(reversed(range(depth - 1)))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(widths[lv + 1], widths[lv], 2, stride=2, bias=False) for lv in levels)
        self.decoder = nn.ModuleList(ResidualBlock(2 * widths[lv], widths[lv], norm) for lv in levels)
        self.head = nn.Conv3d(widths[0], out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        gain = math.sqrt(2.0 / (1 + SLOPE**2))
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                taps = math.prod(m.kernel_size)
                fan_in = m.in_channels * taps // (math.prod(m.stride) if isinstance(m, nn.ConvTranspose3d) else 1)
                nn.init.normal_(m.weight, 0.0, gain / math.sqrt(fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encoder_modules(self) -> list[str]:
        """The child modules that make up the encoder."""
        return ["encoder"]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level, finest first, the bottleneck last."""
        return encode_levels("unet3d", self.encoder, x, self.depth)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the feature maps that ``encode`` returned."""
        x = features[-1]
        for up, block, skip in zip(self.upsample, self.decoder, reversed(features[:-1])):
            x = block(torch.cat((up(x), skip), dim=1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, out_channels, D, H, W)."""
        return self.decode(self.encode(x))


@seg.hookimpl
def register_backbones(register):
    """Register ``unet3d``."""
    register("unet3d", UNet3D)
