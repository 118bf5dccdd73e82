"""A PNG per case for a quick look: axial, coronal and sagittal slices through the labelled region, with the
labels overlaid in colour (SimpleITK's LabelOverlay and PNG writer; no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from seg.core.io import atomic_path

PANEL = 256


def _panel(image: np.ndarray, labels: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """One RGB panel (at most PANEL x PANEL, square pixels) of a 2D slice with its labels overlaid."""
    gray = np.clip((image + 160.0) / 400.0 * 255.0, 0, 255).astype(np.uint8)  # abdomen window W400 L40
    img, lab = sitk.GetImageFromArray(gray), sitk.GetImageFromArray(labels.astype(np.uint8))
    for item in (img, lab):
        item.SetSpacing((col_mm, row_mm))
    height, width = gray.shape[0] * row_mm, gray.shape[1] * col_mm
    step = max(height, width) / PANEL
    ref = sitk.Image((max(1, round(width / step)), max(1, round(height / step))), sitk.sitkUInt8)
    ref.SetSpacing((step, step))
    img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear)
    lab = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor)
    rgb = sitk.GetArrayFromImage(sitk.LabelOverlay(img, lab, opacity=0.45))
    canvas = np.zeros((PANEL, PANEL, 3), np.uint8)
    canvas[: rgb.shape[0], : rgb.shape[1]] = rgb[:PANEL, :PANEL]
    return canvas


def write_preview(image: sitk.Image, labels: sitk.Image, path: Path) -> None:
    """Write three orthogonal slices through the labels' centre (or the volume's) as one PNG, atomically."""
    oriented = sitk.DICOMOrient(image, "LPS")
    lab = sitk.DICOMOrient(labels, "LPS")
    arr = sitk.GetArrayFromImage(oriented).astype(np.float32)
    lbl = sitk.GetArrayFromImage(lab)
    sx, sy, sz = oriented.GetSpacing()
    fg = np.argwhere(lbl > 0)
    z, y, x = (fg.mean(0) if len(fg) else np.array(arr.shape) / 2).astype(int)
    panels = [
        _panel(arr[z], lbl[z], sy, sx),
        _panel(arr[::-1, y, :], lbl[::-1, y, :], sz, sx),
        _panel(arr[::-1, :, x], lbl[::-1, :, x], sz, sy),
    ]
    with atomic_path(path, suffix=".png") as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.concatenate(panels, axis=1), isVector=True), str(tmp))
