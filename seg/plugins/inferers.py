"""Built-in inferers: the paper's z sliding window (optionally limited to a coarsely found z-range), and
one whole-volume forward pass.

``z_sliding_window``: a window of ``window`` slices by the whole (padded) H x W slice slides along z.
Window starts follow nnU-Net: the fewest windows whose stride is at most ``window * (1 - overlap)``, spread
evenly from slice 0 to the last window ending at the last slice. Beyond the paper, ``stretch`` lets the
window grow (in steps of ``divisor``, up to ``stretch * window`` slices) when that forwards fewer slices in
all: a 83-slice abdomen takes one 96-slice window instead of two 80-slice ones that overlap on 77 slices
(the network is fully convolutional; ``stretch=1`` is the paper's fixed window). Each window's softmax
probabilities are weighted by a Gaussian along z and the weighted sums divided by the summed weights per
slice. Since the window spans the whole slice there is a single in-plane position, so nnU-Net's in-plane
Gaussian factor multiplies numerator and denominator alike and cancels: z weights alone give the same blend.

Memory: only one window's span of running sums is held in float32, on the device, as a ring buffer of
``window`` slices; a slice no later window touches is finalized straight into the CPU output (float16 at
reduced precision). For the paper's 14 classes x 80 x 160 x 160 that is 115 MB on the GPU at any scan length.

``roi="coarse"`` (beyond the paper, whose stated limitation is long scans: time spent and false positives
outside the abdomen). Rule: a coarse pass of the same network on non-overlapping windows of the volume
downsampled in-plane by ``roi_downsample`` counts foreground voxels per slice; foreground slices separated
by at most half a window are merged into runs; the run with the most foreground voxels, widened by
``roi_margin`` slices (default half a window) on each side and to at least one window, is run with the full
overlap; every other slice is background. No foreground at all falls back to the full run. Failure modes:
an organ part farther than the margin from what the coarse pass found is lost (a network that misses organ
tips at the coarse scale); a coarse false-positive run with more voxels than the true abdomen wins; organs
that run the length of the scan (aorta, IVC, esophagus) keep every slice, and the coarse pass then only adds
its own cost (measured: docs/benchmarks.md, Coarse ROI).

``mirror`` (both inferers; beyond the paper, off by default): test-time mirroring as in nnU-Net v1. Every
network evaluation (each window, the coarse pass too) becomes the mean of the softmax probabilities of the
input and of its flips along every non-empty combination of the given axes (2^n passes for n axes), each
flipped back. Axes are named for the preprocessed array (z, y, x): after ``reorient`` (LPS), "x" is the
patient's right-left axis, "y" anterior-posterior, "z" inferior-superior. A network that tells left from right
organs by their side (kidneys, adrenal glands) may swap them in the flipped pass; ``benchmarks/bench_mirroring.py``
measures what mirroring costs and changes.
"""

from __future__ import annotations

import itertools
import math

import attrs
import numpy as np
import torch
import torch.nn.functional as F

import seg
from seg.core.errors import ConfigError
from seg.core.inference import autocast_context, class_argmax, gaussian_importance, scores_dtype


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """First slices of the windows covering ``length`` slices (one window at 0 when ``length <= window``)."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / (window * (1 - overlap))) + 1
    step = (length - window) / (count - 1)
    return [round(step * i) for i in range(count)]


def window_plan(length: int, window: int, overlap: float, divisor: int, stretch: float) -> tuple[int, list[int]]:
    """The window length and starts that forward the fewest slices for ``length`` slices: lengths from
    ``window`` up to ``stretch * window`` in steps of ``divisor`` (the shortest of equal cost wins)."""
    best = None
    for w in range(window, max(window, int(window * stretch)) + 1, divisor):
        starts = window_starts(max(length, w), w, overlap)
        if best is None or len(starts) * w < len(best[1]) * best[0]:
            best = (w, starts)
    return best


def roi_from_counts(counts: np.ndarray, window: int, margin: int) -> tuple[int, int] | None:
    """The z-range [z0, z1) to segment finely, from per-slice foreground voxel counts (module docstring)."""
    slices = np.flatnonzero(counts)
    if slices.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(slices) - 1 > window // 2) + 1
    runs = np.split(slices, breaks)
    best = max(runs, key=lambda run: counts[run[0]:run[-1] + 1].sum())  # first of equals
    length = len(counts)
    z0, z1 = max(0, int(best[0]) - margin), min(length, int(best[-1]) + 1 + margin)
    need = min(window, length)
    if z1 - z0 < need:
        z0 = max(0, z0 - (need - (z1 - z0)) // 2)
        z1 = min(length, z0 + need)
        z0 = z1 - need
    return z0, z1


#: The dims of a preprocessed batch (B, C, z, y, x) that ``mirror`` axes name.
MIRROR_AXES = {"z": 2, "y": 3, "x": 4}


def mirror_flips(mirror) -> list[tuple[int, ...]]:
    """The flip dims of every non-empty combination of the ``mirror`` axes (the identity pass is not listed)."""
    dims = [MIRROR_AXES[axis] for axis in mirror]
    return [combo for n in range(1, len(dims) + 1) for combo in itertools.combinations(dims, n)]


def _check_mirror(mirror, name: str) -> None:
    valid = isinstance(mirror, (list, tuple)) and all(isinstance(a, str) and a in MIRROR_AXES for a in mirror)
    _check(valid and len(set(mirror)) == len(mirror), name,
           f"mirror={mirror!r} must be a list of distinct axes among 'x', 'y', 'z' (e.g. mirror = [\"x\"])")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_end(image: torch.Tensor, size: tuple[int, int, int], value: float) -> torch.Tensor:
    """``image`` (1, C, D, H, W) padded at the far end of each spatial axis to ``size`` with ``value``."""
    pads = [max(0, s - n) for s, n in zip(size, image.shape[2:])]
    if not any(pads):
        return image
    return F.pad(image, (0, pads[2], 0, pads[1], 0, pads[0]), value=value)


def _logits(network: torch.nn.Module, batch: torch.Tensor, device: torch.device, precision: str,
            name: str, flips: list[tuple[int, ...]] = ()) -> torch.Tensor:
    """The network's output for a CPU batch, on ``device``, checked to keep the input's spatial shape.

    With ``flips`` (``mirror_flips``): the log of the mean softmax over the batch and its flips, each output
    flipped back, in float32; its softmax is that mean and its argmax the mean's argmax.
    """
    x = batch.to(device, non_blocking=True)
    with autocast_context(device, precision):
        logits = network(x)
    if logits.dim() != 5 or logits.shape[0] != x.shape[0] or logits.shape[2:] != x.shape[2:]:
        raise ConfigError(f"inferer {name}: the network maps input {tuple(x.shape)} to {tuple(logits.shape)}; "
                          f"set the option divisor to what its downsampling needs")
    if not flips:
        return logits
    total = torch.softmax(logits, 1, torch.float32)
    del logits
    for dims in flips:
        with autocast_context(device, precision):
            flipped = network(torch.flip(x, dims))
        total += torch.softmax(flipped, 1, torch.float32).flip(dims)
        del flipped
    return total.div_(len(flips) + 1).log_()


class _ZBlend:
    """Gaussian-weighted mean along z of window probabilities, held for one window's span (a ring buffer).

    Slice z lives in slot ``z % window``. Windows must arrive in non-decreasing start order: when one
    starting at s arrives, every slice before s is final and is written to ``out[:, z, :H, :W]``.
    """

    def __init__(self, starts: list[int], window: int, out_shape: tuple[int, int, int], device: torch.device,
                 dtype: torch.dtype, out: torch.Tensor | None, labels: bool = False):
        self.window, self.out_shape, self.dtype, self.out, self.labels = window, out_shape, dtype, out, labels
        profile = gaussian_importance((window,)).double()
        total = torch.zeros(starts[-1] + window, dtype=torch.float64)
        for s in starts:
            total[s:s + window] += profile
        self.weight = profile.float().to(device)
        self.total = total.float().to(device)
        self.ring = None
        self.done = 0

    def add(self, start: int, probs: torch.Tensor) -> None:
        """Blend one window's probabilities (K, window, H', W') starting at slice ``start``."""
        self._finalize(start)
        if self.ring is None:
            self.ring = torch.zeros_like(probs)
            if self.out is None:
                shape = self.out_shape if self.labels else (probs.shape[0], *self.out_shape)
                self.out = torch.empty(shape, dtype=torch.uint8 if self.labels else self.dtype)
        probs.mul_(self.weight.view(1, -1, 1, 1))
        r = start % self.window
        self.ring[:, r:] += probs[:, :self.window - r]
        self.ring[:, :r] += probs[:, self.window - r:]

    def finish(self) -> torch.Tensor:
        """Finalize the remaining slices and return the output (K, D, H, W)."""
        self._finalize(len(self.total))
        return self.out

    def _finalize(self, end: int) -> None:
        depth, height, width = self.out_shape
        while self.done < end:
            slot = self.done % self.window
            stop = min(end, self.done + self.window - slot)
            n = stop - self.done
            if self.done < depth:
                keep = min(stop, depth) - self.done
                sums = self.ring[:, slot:slot + keep, :height, :width]
                if self.labels:  # dividing by the positive weight total leaves the argmax unchanged
                    self.out[self.done:self.done + keep] = class_argmax(sums).cpu()
                else:
                    mean = sums / self.total[self.done:self.done + keep].view(1, -1, 1, 1)
                    self.out[:, self.done:self.done + keep] = mean.to(self.dtype).cpu()
            self.ring[:, slot:slot + n] = 0
            self.done = stop


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"inferer {name}: {message}")


@attrs.frozen
class ZSlidingWindow:
    """The paper's inference: windows of whole slices sliding along z, blended with Gaussian weights."""

    window: int = 80
    overlap: float = 0.5
    batch: int = 1
    divisor: int = 16
    stretch: float = 1.25
    roi: str | None = None
    roi_downsample: int = 2
    roi_margin: int | None = None
    mirror: list[str] | tuple[str, ...] = ()

    def __attrs_post_init__(self):
        name = "z_sliding_window"
        _check(isinstance(self.window, int) and self.window >= 1, name, f"window={self.window!r} must be >= 1")
        _check(isinstance(self.overlap, (int, float)) and 0 <= self.overlap < 1, name,
               f"overlap={self.overlap!r} must be in [0, 1)")
        _check(isinstance(self.batch, int) and self.batch >= 1, name, f"batch={self.batch!r} must be >= 1")
        _check(isinstance(self.divisor, int) and self.divisor >= 1, name, f"divisor={self.divisor!r} must be >= 1")
        _check(self.window % self.divisor == 0, name,
               f"window={self.window} must be a multiple of divisor={self.divisor}")
        _check(isinstance(self.stretch, (int, float)) and self.stretch >= 1, name,
               f"stretch={self.stretch!r} must be >= 1")
        _check(self.roi in (None, "none", "coarse"), name, f"roi={self.roi!r} must be 'coarse' or 'none'")
        _check(isinstance(self.roi_downsample, int) and self.roi_downsample >= 1, name,
               f"roi_downsample={self.roi_downsample!r} must be >= 1")
        _check(self.roi_margin is None or (isinstance(self.roi_margin, int) and self.roi_margin >= 0), name,
               f"roi_margin={self.roi_margin!r} must be >= 0")
        _check_mirror(self.mirror, name)

    def __call__(self, network: torch.nn.Module, image: torch.Tensor, *, device: torch.device,
                 precision: str) -> torch.Tensor:
        """Class probabilities (K, D, H, W) on the CPU for ``image`` (1, C, D, H, W) on the CPU."""
        return self._run(network, image, torch.device(device), precision, labels=False)

    def labels(self, network: torch.nn.Module, image: torch.Tensor, *, device: torch.device,
               precision: str) -> torch.Tensor:
        """The argmax of the probabilities, uint8 (D, H, W), without holding them: memory flat in scan length."""
        return self._run(network, image, torch.device(device), precision, labels=True)

    def _run(self, network, image, device, precision, labels: bool) -> torch.Tensor:
        pad_value = float(image.min())
        with torch.inference_mode():
            if self.roi != "coarse":
                return self._blend(network, image, device, precision, pad_value, labels=labels)
            z_range, classes = self._coarse_range(network, image, device, precision, pad_value)
            depth = image.shape[2]
            if z_range is None or z_range == (0, depth):
                return self._blend(network, image, device, precision, pad_value, labels=labels)
            z0, z1 = z_range
            shape = image.shape[2:] if labels else (classes, *image.shape[2:])
            out = torch.zeros(shape, dtype=torch.uint8 if labels else scores_dtype(precision))
            if not labels:
                out[0] = 1  # background outside the range (label 0 is already so)
            self._blend(network, image[:, :, z0:z1], device, precision, pad_value, out[..., z0:z1, :, :], labels)
            return out

    def _blend(self, network, image, device, precision, pad_value, out=None, labels=False) -> torch.Tensor:
        _, _, depth, height, width = image.shape
        window, starts = window_plan(depth, self.window, self.overlap, self.divisor, self.stretch)
        size = (max(depth, window), _round_up(height, self.divisor), _round_up(width, self.divisor))
        padded = _pad_end(image, size, pad_value)
        if labels and len(starts) == 1:  # nothing to blend: the argmax of the logits is that of the probabilities
            logits = _logits(network, padded[:, :, :window], device, precision, "z_sliding_window",
                             mirror_flips(self.mirror))
            found = class_argmax(logits[0, :, :depth, :height, :width]).cpu()
            return found if out is None else out.copy_(found)
        blend = _ZBlend(starts, window, (depth, height, width), device, scores_dtype(precision), out, labels)
        for i in range(0, len(starts), self.batch):
            group = starts[i:i + self.batch]
            batch = torch.cat([padded[:, :, s:s + window] for s in group])
            logits = _logits(network, batch, device, precision, "z_sliding_window", mirror_flips(self.mirror))
            probs = torch.softmax(logits, 1, torch.float32)
            for start, window_probs in zip(group, probs):
                blend.add(start, window_probs)
            del batch, logits, probs, window_probs  # not alive during the next forward pass: a flat memory peak
        return blend.finish()

    def _coarse_range(self, network, image, device, precision, pad_value):
        """The fine z-range (or None) and the number of classes, from one coarse pass (module docstring)."""
        _, _, depth, height, width = image.shape
        f = self.roi_downsample
        size = (max(depth, self.window), _round_up(height, self.divisor * f), _round_up(width, self.divisor * f))
        small = _pad_end(image, size, pad_value)
        if f > 1:
            small = F.avg_pool3d(small, (1, f, f))
        rows, cols = -(-height // f), -(-width // f)
        counts = torch.zeros(size[0], dtype=torch.int64)
        starts = window_starts(size[0], self.window, 0.0)
        for i in range(0, len(starts), self.batch):
            group = starts[i:i + self.batch]
            batch = torch.cat([small[:, :, s:s + self.window] for s in group])
            logits = _logits(network, batch, device, precision, "z_sliding_window", mirror_flips(self.mirror))
            found = (logits[:, :, :, :rows, :cols].argmax(1) > 0).sum((-2, -1)).cpu()
            for start, per_slice in zip(group, found):
                counts[start:start + self.window] = torch.maximum(counts[start:start + self.window], per_slice)
        margin = self.window // 2 if self.roi_margin is None else self.roi_margin
        return roi_from_counts(counts[:depth].numpy(), self.window, margin), logits.shape[1]


@attrs.frozen
class WholeVolume:
    """One forward pass over the whole volume (with ``mirror``, one per flip), padded to a multiple of
    ``divisor`` and cropped back."""

    divisor: int = 16
    mirror: list[str] | tuple[str, ...] = ()

    def __attrs_post_init__(self):
        _check(isinstance(self.divisor, int) and self.divisor >= 1, "whole_volume",
               f"divisor={self.divisor!r} must be >= 1")
        _check_mirror(self.mirror, "whole_volume")

    def __call__(self, network: torch.nn.Module, image: torch.Tensor, *, device: torch.device,
                 precision: str) -> torch.Tensor:
        """Class probabilities (K, D, H, W) on the CPU for ``image`` (1, C, D, H, W) on the CPU."""
        device = torch.device(device)
        _, _, depth, height, width = image.shape
        size = tuple(_round_up(n, self.divisor) for n in (depth, height, width))
        with torch.inference_mode():
            padded = _pad_end(image, size, float(image.min()))
            logits = _logits(network, padded, device, precision, "whole_volume",
                             mirror_flips(self.mirror))[0, :, :depth, :height, :width]
            return torch.softmax(logits, 0, torch.float32).to(scores_dtype(precision)).cpu()


@seg.hookimpl
def register_inferers(register):
    """The built-in inferers."""
    register("z_sliding_window", ZSlidingWindow)
    register("whole_volume", WholeVolume)
