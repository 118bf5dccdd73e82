"""Training patches from preprocessed (z, y, x) volumes, and the fine-tuning augmentations.

Everything random draws from one ``numpy.random.Generator`` so a resumed run samples exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from seg.core.config import Augment


def foreground_slices(label: np.ndarray) -> np.ndarray:
    """The z indices of slices that hold any foreground voxel."""
    return np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))


def _pad_to(array: np.ndarray, size, value) -> np.ndarray:
    pads = [(0, max(0, s - d)) for s, d in zip(size, array.shape)]
    return np.pad(array, pads, constant_values=value) if any(p[1] for p in pads) else array


def _start(center: int, extent: int, patch: int, rng: np.random.Generator) -> int:
    """A uniformly random patch start in [0, extent - patch] whose patch contains ``center``."""
    low, high = max(0, center - patch + 1), min(center, extent - patch)
    return int(rng.integers(low, high + 1))


def sample_patch(image: np.ndarray, label: np.ndarray | None, size, rng: np.random.Generator,
                 fg_slices: np.ndarray | None = None, pad_value: float | None = None):
    """A random ``size`` (d, h, w) patch of ``image`` (and ``label``).

    With ``fg_slices`` non-empty the patch contains at least one foreground voxel (the paper: every
    fine-tuning patch holds some organ); volumes smaller than the patch are padded with ``pad_value``
    (default: the image minimum, i.e. air after clipping) and label 0.
    """
    pad_value = float(image.min()) if pad_value is None else pad_value
    image = _pad_to(image, size, pad_value)
    label = None if label is None else _pad_to(label, size, 0)
    if label is not None and fg_slices is not None and len(fg_slices):
        z = int(fg_slices[rng.integers(len(fg_slices))])
        ys, xs = np.nonzero(label[z])
        pick = rng.integers(len(ys))
        center = (z, int(ys[pick]), int(xs[pick]))
    else:
        center = tuple(int(rng.integers(e)) for e in image.shape)
    starts = [_start(c, e, p, rng) for c, e, p in zip(center, image.shape, size)]
    window = tuple(slice(s, s + p) for s, p in zip(starts, size))
    image_patch = np.ascontiguousarray(image[window], dtype=np.float32)
    label_patch = None if label is None else np.ascontiguousarray(label[window], dtype=np.int64)
    return image_patch, label_patch


def augment(image: np.ndarray, label: np.ndarray | None, cfg: Augment, rng: np.random.Generator):
    """Random flips along each axis, intensity scale and shift, Gaussian noise (each off when 0)."""
    for axis in range(3):
        if cfg.flip_prob and rng.random() < cfg.flip_prob:
            image = np.flip(image, axis)
            label = None if label is None else np.flip(label, axis)
    if cfg.intensity_scale:
        image = image * (1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale))
    if cfg.intensity_shift:
        image = image + rng.uniform(-cfg.intensity_shift, cfg.intensity_shift)
    if cfg.noise_std:
        image = image + rng.normal(0.0, cfg.noise_std, image.shape)
    image = np.ascontiguousarray(image, dtype=np.float32)
    return image, None if label is None else np.ascontiguousarray(label)
