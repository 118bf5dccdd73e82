"""Training patches from preprocessed (z, y, x) volumes.

Fine-tuning patches are centred on a voxel drawn by one of two rules: the paper's (a random foreground voxel
of a random slice that holds foreground, so the liver dominates) or, for a share ``class_share`` of the
patches, nnU-Net's class-aware rule (a voxel of a class drawn uniformly among those present in the case, so
small organs are seen as often as large ones). Everything random draws from one ``numpy.random.Generator``
so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np


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
                 fg_slices: np.ndarray | None = None, pad_value: float | None = None, centre=None):
    """A random ``size`` (d, h, w) patch of ``image`` (and ``label``).

    The patch contains ``centre`` (a voxel index) when given; else, with ``fg_slices`` non-empty, at least one
    foreground voxel (the paper: every fine-tuning patch holds some organ). Volumes smaller than the patch
    are padded at their end with ``pad_value`` (default: the image minimum, i.e. air after clipping) and label 0.
    """
    pad_value = float(image.min()) if pad_value is None else pad_value
    image = _pad_to(image, size, pad_value)
    label = None if label is None else _pad_to(label, size, 0)
    if centre is not None:
        center = tuple(int(c) for c in centre)
    elif label is not None and fg_slices is not None and len(fg_slices):
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


class LabeledPatches:
    """Fine-tuning batches from preprocessed labeled cases: a case drawn uniformly, then a patch centred by
    the class-aware rule with probability ``class_share``, else by the paper's foreground rule."""

    def __init__(self, cases, size, class_share: float, rng: np.random.Generator):
        self.images = [np.asarray(c.image) for c in cases]
        self.labels = [np.asarray(c.label) for c in cases]
        self.size, self.class_share, self.rng = list(size), class_share, rng
        self.fg = [foreground_slices(label) for label in self.labels]
        self.voxels = [class_voxels(label) for label in self.labels] if class_share > 0 else None

    def centre(self, index: int) -> tuple[tuple[int, int, int] | None, int | None]:
        """(voxel, class) chosen by the class-aware rule for case ``index``; (None, None) for the paper's rule
        (or a case without foreground)."""
        if not self.class_share or not self.voxels[index] or self.rng.random() >= self.class_share:
            return None, None
        classes = sorted(self.voxels[index])
        chosen = classes[int(self.rng.integers(len(classes)))]
        flat = self.voxels[index][chosen]
        voxel = np.unravel_index(int(flat[self.rng.integers(len(flat))]), self.labels[index].shape)
        return tuple(int(v) for v in voxel), chosen

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 1, D, H, W) float32 and labels (B, D, H, W) int64."""
        images, labels = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.images)))
            centre, _ = self.centre(i)
            image, label = sample_patch(self.images[i], self.labels[i], self.size, self.rng, self.fg[i],
                                        centre=centre)
            images.append(image)
            labels.append(label)
        return np.stack(images)[:, None], np.stack(labels)


def class_voxels(label: np.ndarray) -> dict[int, np.ndarray]:
    """Flat indices of every foreground class's voxels (classes absent from ``label`` have no entry)."""
    flat = label.ravel()
    order = np.argsort(flat, kind="stable")
    values, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(flat))
    return {int(v): order[a:b] for v, a, b in zip(values, starts, ends) if v != 0}
