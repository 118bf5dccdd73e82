"""The inference contract: inferers, postprocessors, Gaussian blending weights, device and precision.

An **inferer** turns a preprocessed image into class scores::

    inferer(network, image, *, device, precision) -> scores

- ``image``: (1, C, D, H, W) float32 on the CPU. D (dim 2) is the z axis, the body's inferior-superior axis
  after preprocessing; H, W are the (resampled) axial slice.
- ``network``: a module already on ``device`` and in eval mode (the inferer moves neither).
- ``scores``: (K, D, H, W) softmax probabilities on the CPU: float32 when ``precision`` is ``"fp32"``,
  float16 otherwise (probabilities lie in [0, 1], where float16 keeps 11 significant bits).

An inferer may also offer ``labels(network, image, *, device, precision) -> labels``: the argmax of its
scores, uint8 (D, H, W) on the CPU, computed without holding them (``seg predict`` uses it unless probabilities
are saved; :func:`infer_labels` falls back to the argmax of the scores).

A **postprocessor** maps a uint8 label array (z, y, x) to a new one (the input is not modified).

Precision rule (``resolve_precision``): on CUDA, ``auto`` means fp16 (the paper: about 36 % less GPU memory
than float32 at the same accuracy) and ``bf16`` falls back to fp16 where the GPU lacks bfloat16. On the CPU
float16 convolutions are never faster, so ``auto`` means fp32, and an explicit ``fp16`` or ``bf16`` becomes
bf16 only where the CPU computes bfloat16 natively (AMX tiles or AVX512-BF16), else fp32: elsewhere the
emulated bfloat16 convolutions are tens of times slower (measured: 45x on an AVX2 CPU).
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from seg.core.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@runtime_checkable
class Inferer(Protocol):
    """Maps a network and a preprocessed image (1, C, D, H, W) to class probabilities (K, D, H, W)."""

    def __call__(self, network: torch.nn.Module, image: torch.Tensor, *, device: torch.device,
                 precision: str) -> torch.Tensor: ...


def class_argmax(scores: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """The class of highest score per voxel of ``scores`` (K, ...), uint8 (...), on the scores' device.

    Ties, and scores within ``tolerance`` of the highest, go to the lowest class (as ``Tensor.argmax``). One
    pass over the voxels per class: on the CPU several times faster than ``argmax(0)``, which reduces across
    the strided class axis. At most 256 classes.
    """
    if len(scores) > 256:
        raise ValueError(f"class_argmax: {len(scores)} classes do not fit uint8")
    threshold = scores.amax(dim=0) - tolerance
    winner = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    for value in range(len(scores) - 1, -1, -1):
        winner.masked_fill_(scores[value] >= threshold, value)
    return winner


def infer_labels(inferer, network: torch.nn.Module, image: torch.Tensor, *, device: torch.device,
                 precision: str) -> np.ndarray:
    """The label array (D, H, W) uint8: the inferer's own ``labels`` if it has one, else its scores' argmax."""
    if hasattr(inferer, "labels"):
        labels = inferer.labels(network, image, device=device, precision=precision)
    else:
        labels = class_argmax(inferer(network, image, device=device, precision=precision))
    return labels.numpy().astype(np.uint8, copy=False)


@runtime_checkable
class Postprocessor(Protocol):
    """Maps a uint8 label array (z, y, x) to a new label array of the same shape."""

    def __call__(self, labels: np.ndarray) -> np.ndarray: ...


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available here (use 'cpu' or 'auto')")
        if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(device)
    raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX tiles or AVX512-BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cuda_has_bf16() -> bool:
    """Whether the current CUDA device computes bfloat16 natively."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run at on ``device`` for a requested ``"auto"|"fp32"|"fp16"|"bf16"`` (module docstring)."""
    if precision not in ("auto", *PRECISIONS):
        raise ConfigError(f"precision {precision!r}: expected auto, fp32, fp16 or bf16")
    if torch.device(device).type == "cuda":
        if precision == "auto":
            return "fp16"
        return "fp16" if precision == "bf16" and not cuda_has_bf16() else precision
    if precision in ("fp16", "bf16") and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast_context(device: torch.device, precision: str):
    """A context running the network's matrix work at ``precision`` on ``device`` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ConfigError(f"precision {precision!r}: expected fp32, fp16 or bf16")
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def scores_dtype(precision: str) -> torch.dtype:
    """The dtype inferers return probabilities in: float32 at fp32, float16 at reduced precision."""
    return torch.float32 if precision == "fp32" else torch.float16


def gaussian_importance(window: tuple[int, ...], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Blending weights for a sliding window of shape ``window`` (any number of dims), as in nnU-Net / MONAI.

    ``w[i, j, ...] = prod_d exp(-(i_d - c_d)^2 / (2 s_d^2))`` with ``s_d = sigma_scale * window[d]`` and the
    centre ``c_d = (window[d] - 1) / 2`` (mirror-symmetric; nnU-Net puts it at ``window[d] // 2``), divided by
    its maximum so the peak is 1; values that underflow to 0 are raised to the smallest positive one so no
    voxel gets zero weight. float32.
    """
    if sigma_scale <= 0 or any(int(n) < 1 for n in window):
        raise ConfigError(f"gaussian_importance: bad window {tuple(window)} or sigma_scale {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for n in window:
        offsets = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        profile = torch.exp(-(offsets**2) / (2 * (sigma_scale * n) ** 2))
        weights = weights[..., None] * profile
    weights = (weights / weights.max()).to(torch.float32)
    return weights.clamp_min(weights[weights > 0].min())
