"""The preprocessing contract: samples, steps that record how to undo themselves, pipelines and their inverse.

A **step** (``Preprocessor``) maps a ``Sample`` (a SimpleITK image and an optional label map on the same grid)
to a new sample and a JSON-serialisable record; ``invert_label(label, record)`` maps a label map on the step's
output grid back onto its input grid exactly (same size, spacing, origin and direction). Intensity-only steps
return the label unchanged.

``run_pipeline`` wraps each step's record with the input and output geometry, so ``invert_labels`` can check
every step's inverse and stamp the exact input geometry back (a step's float round-off never reaches the
output). Inference inverts argmax label maps only, never class scores: the resample step's inverse interpolates
each label's one-hot map linearly and takes the argmax (label-safe: it never invents a label, and gives smooth
boundaries on a fine grid instead of nearest-neighbour staircases).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs
import numpy as np
import SimpleITK as sitk

from seg.core import plugins
from seg.core.errors import DataError
from seg.core.io import Geometry


@attrs.frozen
class Sample:
    """An image and, where known, its label map on exactly the same grid."""

    image: sitk.Image
    label: sitk.Image | None = None


@runtime_checkable
class Preprocessor(Protocol):
    """One preprocessing step: maps a sample forward and a label map back."""

    def __call__(self, sample: Sample) -> tuple[Sample, dict]:
        """The new sample and a JSON-serialisable record of what was done."""

    def invert_label(self, label: sitk.Image, record: dict) -> sitk.Image:
        """``label`` on this step's output grid, mapped onto its input grid (same size and geometry)."""


def geometry_dict(geometry: Geometry | sitk.Image) -> dict:
    """The JSON form of a geometry (or of an image's geometry)."""
    if isinstance(geometry, sitk.Image):
        geometry = Geometry.of(geometry)
    return {k: [int(v) if k == "size" else float(v) for v in getattr(geometry, k)]
            for k in ("size", "spacing", "origin", "direction")}


def geometry_from_dict(data: dict) -> Geometry:
    """The inverse of ``geometry_dict``."""
    return Geometry(tuple(int(v) for v in data["size"]), *(tuple(float(v) for v in data[k])
                                                          for k in ("spacing", "origin", "direction")))


def to_array(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` as a float32 array indexed (z, y, x)."""
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)


def from_array(array: np.ndarray, geometry: Geometry | sitk.Image | dict) -> sitk.Image:
    """A SimpleITK image of ``array`` (z, y, x) placed on ``geometry`` (a Geometry, its dict, or an image)."""
    if isinstance(geometry, dict):
        geometry = geometry_from_dict(geometry)
    elif isinstance(geometry, sitk.Image):
        geometry = Geometry.of(geometry)
    if tuple(array.shape[::-1]) != tuple(geometry.size):
        raise ValueError(f"array of shape {array.shape} (z, y, x) does not fit grid size {geometry.size} (x, y, z)")
    return geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))


def build_pipeline(steps: list[tuple[str, dict]]) -> list[Preprocessor]:
    """The steps named by ``(name, options)`` pairs, built by their registered factories."""
    pipeline = []
    for i, (name, options) in enumerate(steps):
        plugins.check_options("preprocessors", name, options, f"preprocess[{i}]")
        pipeline.append(plugins.get("preprocessors", name)(**options))
    return pipeline


def run_pipeline(pipeline: list[Preprocessor], sample: Sample) -> tuple[Sample, list[dict]]:
    """Run every step; returns the final sample and one record per step (what ``invert_labels`` needs)."""
    if sample.label is not None and not Geometry.of(sample.label).matches(Geometry.of(sample.image)):
        raise DataError("label map and image lie on different grids (size, spacing, origin or direction)")
    records = []
    for step in pipeline:
        before = geometry_dict(sample.image)
        sample, record = step(sample)
        records.append({"step": type(step).__name__, "input": before, "output": geometry_dict(sample.image),
                        "record": record})
    return sample, records


def invert_labels(pipeline: list[Preprocessor], labels: sitk.Image | np.ndarray, records: list[dict]) -> sitk.Image:
    """A uint8 label map on the preprocessed grid (image, or array (z, y, x)) mapped onto the original grid."""
    if len(records) != len(pipeline):
        raise ValueError(f"{len(records)} records for a pipeline of {len(pipeline)} steps")
    if not records:
        return labels if isinstance(labels, sitk.Image) else sitk.GetImageFromArray(np.asarray(labels, np.uint8))
    final = geometry_from_dict(records[-1]["output"])
    if isinstance(labels, sitk.Image):
        if not Geometry.of(labels).matches(final):
            raise ValueError("label map does not lie on the preprocessed grid its records describe")
        labels = sitk.GetArrayViewFromImage(labels)
    label = from_array(np.asarray(labels).astype(np.uint8), final)
    for step, record in zip(reversed(pipeline), reversed(records)):
        label = step.invert_label(label, record["record"])
        expected = geometry_from_dict(record["input"])
        if not Geometry.of(label).matches(expected, tol=1e-3):
            raise RuntimeError(f"{record['step']}.invert_label returned grid {Geometry.of(label)}; "
                               f"expected its input grid {expected}")
        label = expected.apply_to(sitk.Cast(label, sitk.sitkUInt8))
    return label
