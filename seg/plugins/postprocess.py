"""Built-in label postprocessing (registered in the ``inferers`` family).

``largest_component``: for each organ, keep only its largest connected component; the voxels of its other
components become background (0). Connectivity is by faces (6 neighbours in 3D), as SimpleITK's
``ConnectedComponent`` and ``scipy.ndimage.label`` default to. Of equally large components the one whose
first voxel comes first in (z, y, x) order is kept.
"""

from __future__ import annotations

import attrs
import numpy as np
import SimpleITK as sitk

import seg
from seg.core.errors import ConfigError


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean array (ties: first in raster order)."""
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    sizes = np.bincount(components.ravel())
    if len(sizes) <= 1:
        return np.zeros_like(mask, dtype=bool)
    return components == 1 + int(np.argmax(sizes[1:]))


@attrs.frozen
class LargestComponent:
    """Keep the largest connected component of each organ (``labels``: which ones; default all)."""

    labels: list[int] | None = None

    def __attrs_post_init__(self):
        if self.labels is not None and (
            not isinstance(self.labels, (list, tuple))
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in self.labels)
        ):
            raise ConfigError(f"postprocess largest_component: labels={self.labels!r} must be a list of "
                              f"organ values 1..255")

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """A copy of the uint8 label array ``labels`` (z, y, x) with the smaller components removed."""
        result = np.array(labels, dtype=np.uint8, copy=True)
        present = np.flatnonzero(np.bincount(result.ravel(), minlength=256)[1:]) + 1
        wanted = present if self.labels is None else [v for v in self.labels if v in set(present.tolist())]
        for value in wanted:
            mask = result == value
            box = _bounding_box(mask)
            drop = mask[box] & ~largest_component_mask(mask[box])
            result[box][drop] = 0
        return result


@seg.hookimpl
def register_inferers(register):
    """The built-in postprocessing steps."""
    register("largest_component", LargestComponent)
