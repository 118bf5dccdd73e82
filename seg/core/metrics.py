"""Dice and normalized surface Dice, with the FLARE22 challenge's rules.

NSD counts boundary voxels: a voxel of a mask's surface (the mask minus its 6-connected erosion) is "within
tolerance" when its distance in mm (from the voxel spacing) to the other mask's surface is at most the
tolerance; NSD = (pred surface within tolerance + gt surface within tolerance) / (both surfaces). This is
MONAI's SurfaceDiceMetric definition; FLARE's official code weights surface elements by their area
(DeepMind's surface-distance), which differs from it by a discretisation error of a few percent on thin
structures and agrees on the cases where the answer is known (identical, shifted, far apart).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: NSD tolerance in mm per FLARE22 label value.
FLARE22_TOLERANCES = {1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0,
                      12: 7.0, 13: 3.0}
#: Tubular organs evaluated only on the axial slices where the ground truth has them (aorta, IVC, esophagus).
SLICE_LIMITED = (5, 6, 10)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    core = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            core &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~core


def _distance_to(surface: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, spacing_zyx, tolerance_mm: float) -> float:
    """NSD of two boolean masks (z, y, x) with voxel spacing in mm; FLARE's rules for empty masks."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    both = pred | gt
    lo = [max(0, int(np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != ax)))[0]) - 2)
          for ax in range(3)]
    hi = [int(np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != ax)))[-1]) + 3 for ax in range(3)]
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    pred, gt = pred[window], gt[window]
    surf_p, surf_g = _surface(pred), _surface(gt)
    within_p = (_distance_to(surf_g, spacing_zyx)[surf_p] <= tolerance_mm).sum()
    within_g = (_distance_to(surf_p, spacing_zyx)[surf_g] <= tolerance_mm).sum()
    return float(within_p + within_g) / float(surf_p.sum() + surf_g.sum())


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing_zyx, labels: dict[int, str],
                  tolerances: dict[int, float]) -> dict[int, tuple[float, float]]:
    """(DSC, NSD) per label value of two label arrays (z, y, x) whose axis 0 is the body axis."""
    scores = {}
    for value in labels:
        p, g = pred == value, gt == value
        if value in SLICE_LIMITED and g.any():
            slices = np.flatnonzero(g.reshape(g.shape[0], -1).any(axis=1))
            p, g = p[slices], g[slices]
        scores[value] = (dice(p, g), normalized_surface_dice(p, g, spacing_zyx, tolerances[value]))
    return scores
