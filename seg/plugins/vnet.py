"""The ``vnet`` backbone: V-Net (Milletari et al. 2016), sized as in the FLARE2022 paper.

Five resolution levels of widths ``base, 2 base, ... 16 base``. Every level is a residual stage of
5x5x5 convolutions; levels are joined by 2x2x2 stride-2 convolutions going down and 2x2x2 stride-2
transposed convolutions going up; the up path concatenates the skip of its level (so an up stage is
twice as wide as its down stage) and a 1x1x1 convolution maps the finest up stage to the logits.
Activations are PReLU (one slope per channel); weights start "he" normal (std sqrt(2 / fan_in)).

Convolutions per stage (``convs``, finest level first; the up path mirrors levels ``depth-2 .. 0``):

- Milletari's layout is ``convs=(1, 2, 3, 3, 3)`` (up path 3, 3, 2, 1): 65.2 M parameters at base 16.
- The default, ``(1, 1, 2, 2, 2)`` (up path 2, 2, 1, 1), is the layout whose size matches the paper:
  43.54 M parameters for 1 input and 14 classes (paper: 43.60 M). It is mattmacy's / MONAI's V-Net
  (45.65 M; down 1, 1, 2, 3, 2, up 2, 2, 1, 1) with its one unmirrored 128-channel convolution removed,
  which is exactly the 2.05 M the paper is smaller by.
- The paper's 218.7 G multiply-accumulates cannot hold for an 80 x 160 x 160 input for any V-Net of
  base width 16: the finest up stage alone (a 32-channel 5x5x5 convolution on 2,048,000 voxels) costs
  125 * 32 * 32 * 2,048,000 = 262.1 G. This network costs 690.7 G there (MONAI's: 813.1 G, 114.7 G
  of it in its 5x5x5 output convolution, which Milletari's 1x1x1 head here replaces); the paper's
  figure is what it costs on about 0.65 M voxels, so it was presumably counted on a smaller input.

Stage form: ``conv-norm-PReLU`` for all but the last convolution of a stage, whose normalised output is
added to the stage input before its PReLU (one activation per convolution, as in Milletari's design).
The input stage's residual is the input tiled to ``base`` channels. When training on the CPU the PReLU
works in place (``InPlacePReLU``), which keeps one activation-sized tensor less per convolution.

Speed without changing the function: the 1x1x1 head (``PointwiseConv3d``) and the 2x2x2 up-convolutions
(``UpConv3d``) are matrix products (oneDNN runs them 2-3x slower as convolutions), PReLU works in place
whenever autograd is off, and ``for_inference()`` folds every batch norm into the convolution before it
(each beside what it replaces: ``benchmarks/bench_layers.py``).
Parameter names and shapes are those of the plain torch layers, so checkpoints are interchangeable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import seg
from seg.core.backbone import encode_levels
from seg.core.errors import ConfigError

NORMS = ("batch", "instance", "none")
PAPER_CONVS = (1, 1, 2, 2, 2)


def he_normal_(module: nn.Module) -> None:
    """"He" normal initialisation of every (transposed) convolution: std sqrt(2 / fan_in), zero bias.

    The fan-in of a stride-s transposed convolution is ``in_channels * prod(kernel) / prod(stride)``: the
    number of weights that reach one output voxel.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            taps = math.prod(m.kernel_size)
            if isinstance(m, nn.ConvTranspose3d):
                fan_in = m.in_channels * taps // math.prod(m.stride)
            else:
                fan_in = m.in_channels // m.groups * taps
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fold_norm(conv: nn.Module, norm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``conv`` with the eval-mode batch norm ``norm`` that follows it folded into its weights, and the identity
    that replaces ``norm``; both unchanged unless ``norm`` is a batch norm with running statistics."""
    if not isinstance(norm, nn.BatchNorm3d) or norm.running_mean is None:
        return conv, norm
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        shift = -norm.running_mean * scale
        if norm.affine:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        view = (1, -1, 1, 1, 1) if isinstance(conv, nn.ConvTranspose3d) else (-1, 1, 1, 1, 1)
        weight = conv.weight * scale.view(view)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
    return conv, nn.Identity()


def _prelu_(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PReLU of ``x`` (B, C, ...) with one slope per channel, written into ``x``."""
    for channel, slope in enumerate(weight.tolist()):
        torch.nn.functional.leaky_relu_(x[:, channel], slope)
    return x


class _PReLUInPlace(torch.autograd.Function):
    """PReLU applied in place, saving its output: with every slope > 0 the output has the input's sign, so
    the backward pass needs no copy of the input (one activation-sized tensor less per convolution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _prelu_(x, weight)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (y.dim() - 2)
        grad_x, grad_w = torch.ops.aten._prelu_kernel_backward(grad, y, weight.view(shape))
        # grad_w holds y * grad where y < 0, that is slope * x * grad.
        return grad_x, grad_w.sum(dim=[d for d in range(y.dim()) if d != 1]) / weight


class InPlacePReLU(nn.PReLU):
    """``nn.PReLU`` (one slope per channel) that overwrites its input: always without autograd (inference:
    about ten times faster than ``nn.PReLU`` on the CPU, which allocates its output), and when training on the CPU
    while every slope is positive (elsewhere when training it is ``nn.PReLU``).

    Only used on tensors nothing else needs: convolution and normalisation outputs, the in-place residual sums.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """PReLU of ``x``, in place when valid."""
        if not torch.is_grad_enabled() and not x.is_meta and x.shape[1] == len(self.weight):
            return _prelu_(x, self.weight)
        valid = torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == self.weight.dtype
        if not valid or self.weight.min() <= 0:
            return super().forward(x)
        return _PReLUInPlace.apply(x, self.weight)


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 ``nn.Conv3d`` computed as one matrix product (oneDNN's 1x1x1 convolution is three times slower)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` (B, in, D, H, W)."""
        flat = torch.bmm(self.weight.flatten(1).expand(len(x), -1, -1), x.flatten(2))  # (B, out, D * H * W)
        return flat.add_(self.bias.view(-1, 1)).view(len(x), -1, *x.shape[2:])


class UpConv3d(nn.ConvTranspose3d):
    """The 2x2x2 stride-2 ``nn.ConvTranspose3d`` as a matrix product and a 3D pixel shuffle: every input voxel
    writes its own 2x2x2 output block (twice as fast on the CPU as oneDNN's transposed convolution)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool):
        super().__init__(in_channels, out_channels, 2, stride=2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The transposed convolution of ``x`` (B, in, D, H, W): (B, out, 2D, 2H, 2W)."""
        (batch, _, d, h, w), out = x.shape, self.out_channels
        blocks = torch.bmm(self.weight.flatten(1).t().expand(batch, -1, -1), x.flatten(2))  # (B, out * 8, DHW)
        blocks = blocks.view(batch, out, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = blocks.reshape(batch, out, 2 * d, 2 * h, 2 * w)
        return y if self.bias is None else y.add_(self.bias.view(1, -1, 1, 1, 1))


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named ``norm`` ("batch", "instance" or "none")."""
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class ResidualConvs(nn.Module):
    """``n`` k x k x k convolutions (k = 5: V-Net's) at one resolution whose output is added to a residual, then
    activated."""

    def __init__(self, in_channels: int, channels: int, n: int, norm: str, kernel: int = 5):
        super().__init__()
        bias = norm == "none"
        self.convs = nn.ModuleList(
            nn.Conv3d(in_channels if i == 0 else channels, channels, kernel, padding=kernel // 2, bias=bias)
            for i in range(n))
        self.norms = nn.ModuleList(make_norm(norm, channels) for _ in range(n))
        self.acts = nn.ModuleList(InPlacePReLU(channels) for _ in range(n))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The stage output for input ``x``; ``residual`` has the output's shape."""
        last = len(self.convs) - 1
        for i, (conv, norm, act) in enumerate(zip(self.convs, self.norms, self.acts)):
            x = norm(conv(x))
            if i == last:
                x = x.add_(residual)  # in place: neither the norm nor the conv needs its output for backward
            x = act(x)
        return x


class InputStage(nn.Module):
    """The finest level: convolutions from the input channels, the input tiled as the residual."""

    def __init__(self, in_channels: int, channels: int, n: int, norm: str, kernel: int = 5):
        super().__init__()
        self.channels = channels
        self.body = ResidualConvs(in_channels, channels, n, norm, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features at the input resolution."""
        if x.shape[1] == 1:  # a view, not a copy
            return self.body(x, x.expand(-1, self.channels, -1, -1, -1))
        repeats = -(-self.channels // x.shape[1])
        return self.body(x, x.repeat(1, repeats, 1, 1, 1)[:, : self.channels])


class DownStage(nn.Module):
    """Halve the resolution with a 2x2x2 stride-2 convolution, then a residual stage."""

    def __init__(self, in_channels: int, channels: int, n: int, norm: str, kernel: int = 5):
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(in_channels, channels, 2, stride=2, bias=norm == "none"),
                                  make_norm(norm, channels), InPlacePReLU(channels))
        self.body = ResidualConvs(channels, channels, n, norm, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features at half the resolution of ``x``."""
        down = self.down(x)
        return self.body(down, down)


class UpStage(nn.Module):
    """Double the resolution with a transposed convolution, concatenate the skip, then a residual stage."""

    def __init__(self, in_channels: int, skip_channels: int, n: int, norm: str, kernel: int = 5):
        super().__init__()
        self.up = nn.Sequential(UpConv3d(in_channels, skip_channels, bias=norm == "none"),
                                make_norm(norm, skip_channels), InPlacePReLU(skip_channels))
        self.body = ResidualConvs(2 * skip_channels, 2 * skip_channels, n, norm, kernel)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Features at the resolution of ``skip``, ``2 * skip_channels`` wide."""
        joined = torch.cat((self.up(x), skip), dim=1)
        return self.body(joined, joined)


class VNet(nn.Module):
    """V-Net (Milletari et al. 2016) of the FLARE2022 paper's size; see the module docstring.

    Options: ``base_channels`` (width of the finest level), ``depth`` (resolution levels), ``norm``
    ("batch", "instance" or "none"), ``convs`` (5x5x5 convolutions per level, finest first; default
    ``(1, 1, 2, 2, 2)`` cut to ``depth``, further levels 2), ``kernel_size`` (odd; V-Net's is 5, 3 costs
    27/125 of the arithmetic: the phantom-scale experiments use it). Inputs need D, H, W divisible by
    ``2 ** (depth - 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, base_channels: int = 16, depth: int = 5,
                 norm: str = "batch", convs: tuple[int, ...] | list[int] | None = None, kernel_size: int = 5):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"vnet: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if depth < 2 or base_channels < 1 or in_channels < 1 or out_channels < 1:
            raise ConfigError(f"vnet: need depth >= 2 and positive channel counts, got depth={depth}, "
                              f"base_channels={base_channels}, in/out channels {in_channels}/{out_channels}")
        convs = tuple(PAPER_CONVS[min(i, len(PAPER_CONVS) - 1)] for i in range(depth)) if convs is None \
            else tuple(convs)
        if len(convs) != depth or min(convs) < 1:
            raise ConfigError(f"vnet: convs needs {depth} (depth) counts >= 1, got {list(convs)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"vnet: kernel_size must be a positive odd number, got {kernel_size}")
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth)]
        self.encoder = nn.ModuleList(
            [InputStage(in_channels, widths[0], convs[0], norm, kernel_size)]
            + [DownStage(widths[lv - 1], widths[lv], convs[lv], norm, kernel_size) for lv in range(1, depth)])
        self.decoder = nn.ModuleList(
            UpStage(widths[lv + 1] * (1 if lv == depth - 2 else 2), widths[lv], convs[lv], norm, kernel_size)
            for lv in reversed(range(depth - 1)))
        self.head = PointwiseConv3d(2 * widths[0], out_channels)
        he_normal_(self)

    def encoder_modules(self) -> list[str]:
        """The child modules that make up the encoder."""
        return ["encoder"]

    def for_inference(self) -> VNet:
        """This network, in eval mode, with every batch norm folded into the convolution before it (the same
        function, one pass over each activation less). Inference only: the state_dict changes."""
        self.eval()
        for stage in (*self.encoder, *self.decoder):
            convs, norms = stage.body.convs, stage.body.norms
            for i in range(len(convs)):
                convs[i], norms[i] = fold_norm(convs[i], norms[i])
            for resize in (getattr(stage, name) for name in ("down", "up") if hasattr(stage, name)):
                resize[0], resize[1] = fold_norm(resize[0], resize[1])
        return self

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level, finest first, the bottleneck last."""
        return encode_levels("vnet", self.encoder, x, self.depth)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the feature maps that ``encode`` returned."""
        x = features[-1]
        for stage, skip in zip(self.decoder, reversed(features[:-1])):
            x = stage(x, skip)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, out_channels, D, H, W)."""
        return self.decode(self.encode(x))


@seg.hookimpl
def register_backbones(register):
    """Register ``vnet``."""
    register("vnet", VNet)
