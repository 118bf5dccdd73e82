"""The paper's preprocessing (section 2.1): reorient, crop to the body, resample, clip and z-score.

Every step keeps the image in physical space (SimpleITK geometry) and records what its exact inverse needs,
so a label map predicted on the preprocessed grid lands on the original grid (``seg.core.preprocessing``).

- ``reorient``: permute and flip the voxel axes to LPS (x to the patient's left, y to posterior, z to
  superior; option ``orientation``). Each axis is matched to the closest physical direction, so an oblique
  scan (gantry tilt) keeps its tilt: it is never interpolated onto an axis-aligned grid, no voxel is
  resampled twice, no corner is cut, and the network sees the scan's own slices, as any viewer shows them.
- ``crop_body``: the bounding box, plus a margin, of the largest connected region above an air threshold.
- ``resample``: each transverse slice to ``in_plane`` voxels and slices to ``z_spacing`` mm, with cubic
  B-spline interpolation, applied as one precomputed 1-D weight matrix per axis (``seg.plugins.resampling``).
- ``clip_zscore``: clip to [low, high] HU, then z-score with the mean and std of the clipped scan.

``crop_body`` and ``resample`` commute with ``reorient``; running them first (``crop_body, resample, reorient,
clip_zscore``) gives the same result and flips a small grid instead of the whole scan.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import SimpleITK as sitk

import seg
from seg.core.errors import ConfigError
from seg.core.io import Geometry
from seg.core.preprocessing import Sample, from_array, geometry_dict, geometry_from_dict, to_array
from seg.plugins.resampling import antialias_sigma, apply_separable, bspline_matrix, linear_matrix, vote


#: Orientation letters: the physical axis (ITK's LPS coordinates) and the way an image axis runs along it.
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def _axis_permutation(direction, orientation: str = "LPS") -> tuple[list[int], list[bool]]:
    """For each axis of ``orientation``, the image axis closest to it and whether it runs the other way."""
    signed = np.asarray(direction, float).reshape(3, 3)  # column j: image axis j in LPS coordinates
    targets = [_LETTERS[letter] for letter in orientation]
    perm = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(signed[targets[a][0], p[a]]) for a in range(3)))
    return list(perm), [bool(signed[targets[a][0], perm[a]] * targets[a][1] < 0) for a in range(3)]


def permute_flip(image: sitk.Image, perm: list[int], flips: list[bool]) -> sitk.Image:
    """``image`` with new axis ``a`` taken from old axis ``perm[a]`` (reversed where ``flips[a]``).

    Pure relabelling of voxels: every voxel keeps its physical position.
    """
    size = image.GetSize()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    old_index = [0, 0, 0]  # the old index of the new first voxel
    for a in range(3):
        old_index[perm[a]] = size[perm[a]] - 1 if flips[a] else 0
    origin = image.TransformIndexToPhysicalPoint(old_index)
    spacing = [image.GetSpacing()[perm[a]] for a in range(3)]
    new_direction = np.stack([direction[:, perm[a]] * (-1 if flips[a] else 1) for a in range(3)], axis=1)
    out = sitk.PermuteAxes(image, perm) if list(perm) != [0, 1, 2] else image
    out = sitk.Flip(out, [bool(f) for f in flips]) if any(flips) else out
    if out is image:
        out = sitk.Image(image)  # never restamp the caller's image
    out.SetSpacing(spacing)
    out.SetOrigin(origin)
    out.SetDirection(new_direction.ravel().tolist())
    return out


class Reorient:
    """Relabel the voxel axes so that x, y, z run toward ``orientation``: by default the patient's left,
    posterior and superior (LPS, ITK's and DICOM's frame; arrays (z, y, x) then show axial slices as
    radiologists view them). Each axis is matched to the closest physical direction, so a tilted scan keeps
    its tilt."""

    def __init__(self, orientation: str = "LPS"):
        code = str(orientation).upper()
        if len(code) != 3 or any(c not in _LETTERS for c in code) or len({_LETTERS[c][0] for c in code}) != 3:
            raise ConfigError(f"reorient.orientation: {orientation!r}; expected one of L/R, P/A, S/I each, "
                              "e.g. 'LPS' or 'RAS'")
        self.orientation = code

    def __call__(self, sample: Sample) -> tuple[Sample, dict]:
        perm, flips = _axis_permutation(sample.image.GetDirection(), self.orientation)
        record = {"permutation": perm, "flips": flips}
        if perm == [0, 1, 2] and not any(flips):
            return sample, record
        label = None if sample.label is None else permute_flip(sample.label, perm, flips)
        return Sample(permute_flip(sample.image, perm, flips), label), record

    def invert_label(self, label: sitk.Image, record: dict) -> sitk.Image:
        """Undo the permutation and flips (exact: voxels are only relabelled)."""
        perm, flips = record["permutation"], record["flips"]
        inverse, inverse_flips = [0, 0, 0], [False] * 3
        for a in range(3):
            inverse[perm[a]], inverse_flips[perm[a]] = a, flips[a]
        if inverse == [0, 1, 2] and not any(inverse_flips):
            return label
        return permute_flip(label, inverse, inverse_flips)


def body_box(array: np.ndarray, spacing, threshold: float, largest_component: bool = True,
             coarse_mm: float = 4.0) -> tuple[list[int], list[int]] | None:
    """The index bounding box (lower, upper inclusive; sitk x, y, z order) of the body in ``array`` (z, y, x).

    The body is the largest face-connected region of voxels above ``threshold``, found on a grid subsampled to
    about ``coarse_mm`` for speed; each face of its box is then refined at full resolution, between the last
    coarse plane outside the body and the first inside. None when no voxel is above the threshold.
    """
    strides = [max(1, int(coarse_mm // s)) for s in spacing[::-1]]  # (z, y, x)
    coarse = np.asarray(array[tuple(slice(None, None, s) for s in strides)]) > threshold
    if not coarse.any():
        return None
    if largest_component:
        components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(coarse.view(np.uint8))),
                                           sortByObjectSize=True)
        coarse = sitk.GetArrayViewFromImage(components) == 1
    inner, outer = [], []  # per axis: (first, last) plane known inside; (first, last) plane that may be inside
    for axis in range(3):
        hits = np.flatnonzero(coarse.any(axis=tuple(a for a in range(3) if a != axis)))
        inner.append((int(hits[0]) * strides[axis], int(hits[-1]) * strides[axis]))
        outer.append((max(0, inner[axis][0] - strides[axis] + 1),
                      min(array.shape[axis] - 1, inner[axis][1] + strides[axis] - 1)))
    lower, upper = [], []
    for axis in range(3):
        region = [slice(lo, hi + 1) for lo, hi in outer]
        region[axis] = slice(outer[axis][0], inner[axis][0] + 1)
        first = np.asarray(array[tuple(region)]) > threshold
        region[axis] = slice(inner[axis][1], outer[axis][1] + 1)
        last = np.asarray(array[tuple(region)]) > threshold
        others = tuple(a for a in range(3) if a != axis)
        lower.append(outer[axis][0] + int(np.flatnonzero(first.any(axis=others))[0]))
        upper.append(inner[axis][1] + int(np.flatnonzero(last.any(axis=others))[-1]))
    return lower[::-1], upper[::-1]


class CropBody:
    """Crop to the body: the box around the largest region above ``threshold`` HU, widened by ``margin_mm``.

    CT air is about -1000 HU and fat about -100 HU, so -500 HU separates the body from the air around it; the
    largest region leaves out a table or blanket that an air gap separates from the patient. A scan with no
    voxel above the threshold is kept whole.
    """

    def __init__(self, threshold: float = -500.0, margin_mm: float = 10.0, largest_component: bool = True):
        if margin_mm < 0:
            raise ConfigError(f"crop_body.margin_mm: {margin_mm} is negative")
        self.threshold, self.margin_mm, self.largest_component = threshold, margin_mm, largest_component

    def __call__(self, sample: Sample) -> tuple[Sample, dict]:
        image = sample.image
        size, spacing = image.GetSize(), image.GetSpacing()
        box = body_box(sitk.GetArrayViewFromImage(image), spacing, self.threshold, self.largest_component)
        if box is None:
            return sample, {"lower": [0, 0, 0], "upper": [0, 0, 0]}
        margin = [math.ceil(self.margin_mm / s - 1e-9) for s in spacing]
        lo = [max(0, box[0][a] - margin[a]) for a in range(3)]
        hi = [min(size[a], box[1][a] + margin[a] + 1) for a in range(3)]
        extent = [hi[a] - lo[a] for a in range(3)]
        label = None if sample.label is None else sitk.RegionOfInterest(sample.label, extent, lo)
        record = {"lower": lo, "upper": [size[a] - hi[a] for a in range(3)]}
        return Sample(sitk.RegionOfInterest(image, extent, lo), label), record

    def invert_label(self, label: sitk.Image, record: dict) -> sitk.Image:
        """Pad the cropped label map with background back to the input size."""
        if not any(record["lower"]) and not any(record["upper"]):
            return label
        return sitk.ConstantPad(label, record["lower"], record["upper"], 0)


class Resample:
    """Resample each transverse slice to ``in_plane`` = [x, y] voxels and the slices to ``z_spacing`` mm.

    x, y and z are the image axes closest to the patient's left-right, anterior-posterior and inferior-superior
    directions, so ``resample`` may run before ``reorient`` (the two commute exactly: the new grid is centred
    and symmetric) and the flips of a RAS-stored scan then move 160 x 160 slices instead of 512 x 512 ones.
    Images use cubic B-spline interpolation (prefiltered, like SimpleITK's ``sitkBSpline``), Gaussian
    pre-smoothed along each axis shrunk by a factor s > 1 (sigma = (s - 1) / 2 input voxels, as scikit-image's
    ``resize``) when ``antialias``. Label maps are resampled label-safely: each label's one-hot map is
    interpolated linearly (kernel widened by s when shrinking, an area vote) and the argmax taken. Slices keep
    exactly ``z_spacing``; the slice count is the old extent over ``z_spacing``, rounded.
    """

    def __init__(self, in_plane: list[int] | tuple[int, int] = (160, 160), z_spacing: float = 2.5,
                 antialias: bool = True):
        if len(in_plane) != 2 or not all(isinstance(n, int) and n >= 1 for n in in_plane):
            raise ConfigError(f"resample.in_plane: {in_plane!r}; expected two positive integers [x, y]")
        if not z_spacing > 0:
            raise ConfigError(f"resample.z_spacing: {z_spacing!r}; expected a positive number of mm")
        self.in_plane, self.z_spacing, self.antialias = list(in_plane), float(z_spacing), bool(antialias)

    def grid(self, geometry: Geometry) -> tuple[Geometry, list[float], list[float]]:
        """The output grid, and per image axis the input index of output voxel 0 and the step between voxels."""
        perm, _ = _axis_permutation(geometry.direction)  # image axis perm[a] runs along L-R, P-A, I-S
        size, step = [0, 0, 0], [0.0, 0.0, 0.0]
        for a, axis in enumerate(perm):
            if a < 2:
                size[axis] = self.in_plane[a]
                step[axis] = geometry.size[axis] / size[axis]
            else:
                size[axis] = max(1, round(geometry.size[axis] * geometry.spacing[axis] / self.z_spacing))
                step[axis] = self.z_spacing / geometry.spacing[axis]
        start = [((geometry.size[a] - 1) - (size[a] - 1) * step[a]) / 2 for a in range(3)]
        direction = np.asarray(geometry.direction).reshape(3, 3)
        origin = np.asarray(geometry.origin) + direction @ (np.asarray(geometry.spacing) * start)
        spacing = [geometry.spacing[a] * step[a] for a in range(3)]
        return Geometry(tuple(size), tuple(spacing), tuple(origin.tolist()), geometry.direction), start, step

    def __call__(self, sample: Sample) -> tuple[Sample, dict]:
        geometry = Geometry.of(sample.image)
        out, start, step = self.grid(geometry)
        # Matrices in (z, y, x) order, mapping input voxels to output voxels along each axis.
        positions = [start[a] + step[a] * np.arange(out.size[a]) for a in (2, 1, 0)]
        sizes = [geometry.size[a] for a in (2, 1, 0)]
        image_weights = [bspline_matrix(n, p, antialias_sigma(s) if self.antialias else 0.0)
                         for n, p, s in zip(sizes, positions, (step[2], step[1], step[0]))]
        image = from_array(apply_separable(sitk.GetArrayViewFromImage(sample.image), image_weights), out)
        label = None
        if sample.label is not None:
            label_weights = [linear_matrix(n, p, s) for n, p, s in zip(sizes, positions, step[::-1])]
            label = from_array(vote(sitk.GetArrayViewFromImage(sample.label), label_weights), out)
        return Sample(image, label), {"input": geometry_dict(geometry), "start": start, "step": step}

    def invert_label(self, label: sitk.Image, record: dict) -> sitk.Image:
        """Resample the label map back onto the input grid (linear one-hot interpolation, then argmax)."""
        original = geometry_from_dict(record["input"])
        start, step = record["start"], record["step"]
        weights = [linear_matrix(label.GetSize()[a], (np.arange(original.size[a]) - start[a]) / step[a], 1 / step[a])
                   for a in (2, 1, 0)]
        return from_array(vote(sitk.GetArrayViewFromImage(label), weights), original)


class ClipZScore:
    """Clip to [``low``, ``high``] HU, then subtract the mean and divide by the std of the clipped scan.

    Per scan, as the paper's reference [11] (nnU-Net-style z-scoring of each image). A fixed ``mean`` and
    ``std`` (both given) replace the per-scan statistics, e.g. dataset-wide ones.
    """

    def __init__(self, low: float = -320.0, high: float = 320.0, mean: float | None = None,
                 std: float | None = None):
        if not low < high:
            raise ConfigError(f"clip_zscore: low ({low}) must be below high ({high})")
        if (mean is None) != (std is None) or (std is not None and not std > 0):
            raise ConfigError("clip_zscore: give both mean and a positive std, or neither")
        self.low, self.high, self.mean, self.std = float(low), float(high), mean, std

    def __call__(self, sample: Sample) -> tuple[Sample, dict]:
        array = np.clip(to_array(sample.image), self.low, self.high)
        mean = float(array.mean(dtype=np.float64)) if self.mean is None else float(self.mean)
        std = float(array.std(dtype=np.float64)) if self.std is None else float(self.std)
        std = std if std > 0 else 1.0  # a constant scan: centre it, nothing to scale
        array -= mean
        array /= std
        return Sample(from_array(array, sample.image), sample.label), {"mean": mean, "std": std}

    def invert_label(self, label: sitk.Image, record: dict) -> sitk.Image:
        """Intensity only: the label map is unchanged."""
        return label


@seg.hookimpl
def register_preprocessors(register):
    """The paper's four steps."""
    register("reorient", Reorient)
    register("crop_body", CropBody)
    register("resample", Resample)
    register("clip_zscore", ClipZScore)
