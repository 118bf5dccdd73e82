"""Organ statistics of a label map (``seg predict --statistics``): volume and intensity per organ.

TotalSegmentator's ``--statistics`` convention, per case and organ: ``volume`` in ml and ``intensity`` (mean
voxel value, HU for CT), with ``intensity_min``, ``intensity_max`` and the voxel count beside them. Computed
on the label map's own grid, which is the input image's grid (``seg predict`` writes labels there), over the
input's original voxel values: no resampling, no interpolation. Every organ of the model is listed; one the
label map does not contain has volume 0 and null (JSON) or empty (CSV) intensities.

- ``CASE.json`` beside ``CASE.nii.gz``: ``{"liver": {"voxels": .., "volume": .., "intensity": ..,
  "intensity_min": .., "intensity_max": ..}, ...}`` in label order.
- ``statistics.csv`` in a prediction folder: one row per case and organ (columns ``STATISTICS_COLUMNS``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import SimpleITK as sitk

from seg.core.errors import DataError
from seg.core.io import write_text

STATISTICS_CSV = "statistics.csv"
STATISTICS_COLUMNS = ("case", "organ", "label", "voxels", "volume_ml", "intensity_mean_hu", "intensity_min_hu",
                      "intensity_max_hu")


def organ_statistics(image: sitk.Image, labels: sitk.Image, organs: dict[int, str]) -> dict[str, dict]:
    """Per organ (``organs``: label value -> name), its voxel count, volume (ml) and mean/min/max of
    ``image`` over its voxels. ``labels`` must have ``image``'s size; its geometry is taken as the image's."""
    if image.GetSize() != labels.GetSize():
        raise DataError(f"label map of size {labels.GetSize()} does not match its image of size {image.GetSize()}")
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    labels.CopyInformation(image)  # same grid by construction; header rounding must not make them differ
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(image, labels)
    voxel_ml = math.prod(image.GetSpacing()) / 1000.0
    result = {}
    for value, name in sorted(organs.items()):
        count = int(stats.GetCount(value)) if stats.HasLabel(value) else 0
        present = count > 0
        result[name] = {
            "label": int(value),
            "voxels": count,
            "volume": count * voxel_ml,
            "intensity": float(stats.GetMean(value)) if present else None,
            "intensity_min": float(stats.GetMinimum(value)) if present else None,
            "intensity_max": float(stats.GetMaximum(value)) if present else None,
        }
    return result


def write_case_statistics(stats: dict[str, dict], path: Path) -> None:
    """``CASE.json``, atomically."""
    write_text(json.dumps(stats, indent=1) + "\n", path)


def read_case_statistics(path: Path) -> dict[str, dict]:
    """A ``CASE.json`` written by ``write_case_statistics``."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable statistics ({exc})") from None


def write_statistics_csv(cases: dict[str, dict[str, dict]], path: Path) -> None:
    """One CSV row per case (in name order) and organ (in label order), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(STATISTICS_COLUMNS)
    for case in sorted(cases):
        for organ, s in sorted(cases[case].items(), key=lambda kv: kv[1]["label"]):
            writer.writerow([case, organ, s["label"], s["voxels"], _number(s["volume"]), _number(s["intensity"]),
                             _number(s["intensity_min"]), _number(s["intensity_max"])])
    write_text(buffer.getvalue(), path)


def _number(value) -> str:
    return "" if value is None else f"{value:.6g}"
