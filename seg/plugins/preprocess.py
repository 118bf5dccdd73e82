"""The paper's preprocessing (section 2.1): reorient, crop to the body, resample, clip and z-score.

Every step keeps the image in physical space (SimpleITK geometry) and records what its exact inverse needs,
so a label map predicted on the preprocessed grid lands on the original grid (``seg.core.preprocessing``).

- ``reorient``: permute and flip the voxel axes to LPS (x to the patient's left, y to posterior, z to
  superior; option ``orientation``). Each axis is matched to the closest physical direction, so an oblique
  scan (gantry tilt) keeps its tilt: it is never interpolated onto an axis-aligned grid, no voxel is
  resampled twice, no corner is cut, and the network sees the scan's own slices, as any viewer shows them.
- ``crop_body``: the bounding box, plus a margin, of the largest connected region above an air threshold.
- ``resample``: each transverse slice to ``in_plane`` voxels and slices to ``z_spacing`` mm, with cubic
  B-spline interpolation, applied as one precomputed 1-D weight matrix per axis (section below).
- ``clip_zscore``: clip to [low, high] HU, then z-score with the mean and std of the clipped scan.

``crop_body`` and ``resample`` commute with ``reorient``; running them first (``crop_body, resample, reorient,
clip_zscore``) gives the same result and flips a small grid instead of the whole scan.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import SimpleITK as sitk
import torch

import seg
from seg.core.errors import ConfigError
from seg.core.inference import class_argmax
from seg.core.io import Geometry
from seg.core.preprocessing import Sample, from_array, geometry_dict, geometry_from_dict, to_array


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


# -- Separable resampling: one (output x input) weight matrix per axis, applied as matrix products --------------
#
# Interpolating from samples f_k is linear, so along one axis it is a matrix W (out x in), and a 3D resample with a
# separable kernel is three matrix products. Cubic B-spline: W = E P^-1 G, where G Gaussian-smooths (anti-aliasing),
# P^-1 turns samples into B-spline coefficients (the interpolation condition f_i = sum_k c_k b3(i - k)) and E
# evaluates the spline at the output positions. Borders mirror about the edge voxel (d c b | a b c d | c b a), as
# ITK's B-spline interpolator and scipy.ndimage's mode="mirror" do. The weights decay fast away from each output
# position, so W is applied in blocks of rows, each touching a short range of columns.


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Indices folded onto 0..n-1 by whole-sample mirroring."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _kernel_matrix(n: int, positions: np.ndarray, kernel, radius: float) -> np.ndarray:
    """Matrix (len(positions), n): row j holds kernel(positions[j] - k) for every integer k, mirrored onto 0..n-1."""
    positions = np.asarray(positions, np.float64)
    k = np.floor(positions).astype(np.int64)[:, None] + np.arange(-math.ceil(radius), math.ceil(radius) + 2)
    rows = np.broadcast_to(np.arange(len(positions))[:, None], k.shape)
    matrix = np.zeros((len(positions), n))
    np.add.at(matrix, (rows, _mirror(k, n)), kernel(positions[:, None] - k))
    return matrix


def _bspline3(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel."""
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def antialias_sigma(step: float) -> float:
    """Gaussian sigma (input voxels) before shrinking by ``step``: (step - 1) / 2, as scikit-image's ``resize``."""
    return max(0.0, (step - 1) / 2)


def _gaussian_taps(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised Gaussian weights at offsets -r..r, r = round(truncate * sigma) (as scipy.ndimage)."""
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def _smoothed_bspline3(sigma: float):
    """The cubic B-spline kernel convolved with the discrete Gaussian of ``sigma``, and its radius."""
    taps = _gaussian_taps(sigma)
    radius = len(taps) // 2
    return (lambda t: sum(w * _bspline3(t - d) for d, w in zip(range(-radius, radius + 1), taps))), radius + 2


def _solve_tridiagonal(lower: np.ndarray, diagonal: np.ndarray, upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve A x = rhs (rhs: n or n x m) for tridiagonal A: A[i, i-1] = lower[i], A[i, i] = diagonal[i],
    A[i, i+1] = upper[i] (Thomas algorithm; A here is diagonally dominant, so no pivoting is needed)."""
    n = len(diagonal)
    c, d = np.empty(n), np.array(rhs, dtype=np.float64)
    c[0], d[0] = upper[0] / diagonal[0], d[0] / diagonal[0]
    for i in range(1, n):
        pivot = diagonal[i] - lower[i] * c[i - 1]
        c[i] = upper[i] / pivot if i < n - 1 else 0.0
        d[i] = (d[i] - lower[i] * d[i - 1]) / pivot
    for i in range(n - 2, -1, -1):
        d[i] -= c[i] * d[i + 1]
    return d


def bspline_matrix(n: int, positions: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """Weights of cubic B-spline interpolation of ``n`` samples at ``positions`` (input index units).

    With ``sigma`` > 0 the samples are first smoothed by a discrete Gaussian of that sigma (anti-aliasing).
    """
    # Smoothing, prefiltering and evaluation are convolutions of the mirrored signal, so they commute:
    # W = E P^-1 G = (E G) P^-1, and E G is evaluation with the smoothed kernel b3 * g.
    kernel, radius = _smoothed_bspline3(sigma) if sigma > 0 else (_bspline3, 2)
    evaluate = _kernel_matrix(n, positions, kernel, radius)
    if n == 1:
        return evaluate
    # The interpolation condition f_i = sum_k c_k b3(i - k) with mirrored c is P c = f, P tridiagonal:
    # rows (1, 4, 1) / 6, first row (4, 2) / 6, last (2, 4) / 6. Weights E P^-1 = (P^-T E^T)^T.
    p_lower, p_upper = np.full(n, 1 / 6), np.full(n, 1 / 6)
    p_upper[0] = p_lower[n - 1] = 2 / 6
    t_lower, t_upper = np.r_[0.0, p_upper[:-1]], np.r_[p_lower[1:], 0.0]  # the diagonals of P^T
    return _solve_tridiagonal(t_lower, np.full(n, 4 / 6), t_upper, evaluate.T).T


def linear_matrix(n: int, positions: np.ndarray, step: float) -> np.ndarray:
    """Weights of linear interpolation at ``positions``, the kernel widened to ``step`` voxels when shrinking.

    Rows are non-negative and sum to one, so interpolated one-hot maps are label votes.
    """
    width = max(1.0, float(step))
    matrix = _kernel_matrix(n, positions, lambda t: np.maximum(0.0, 1 - np.abs(t) / width), width)
    return matrix / matrix.sum(axis=1, keepdims=True)


class _Banded:
    """A weight matrix kept as blocks of consecutive rows, each with the column range its weights touch."""

    def __init__(self, weights: np.ndarray, rows_per_block: int = 16, tol: float = 1e-7):
        self.blocks = []
        for r0 in range(0, weights.shape[0], rows_per_block):
            block = weights[r0:r0 + rows_per_block]
            used = np.flatnonzero((np.abs(block) > tol * np.abs(block).max()).any(axis=0))
            lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
            self.blocks.append((lo, hi, torch.from_numpy(np.ascontiguousarray(block[:, lo:hi], np.float32))))

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``: the last dimension resampled."""
        return torch.cat([x[..., lo:hi] @ w.T for lo, hi, w in self.blocks], dim=-1)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """``W @ x``: the second-to-last dimension resampled."""
        return torch.cat([w @ x[..., lo:hi, :] for lo, hi, w in self.blocks], dim=-2)


def apply_separable(volume: np.ndarray, weights: list[np.ndarray], chunk_voxels: int = 1 << 20) -> np.ndarray:
    """``volume`` (z, y, x) resampled by the matrices ``weights`` = [W_z, W_y, W_x]; float32 (z, y, x).

    A slab of slices at a time is converted to float32 and resampled along x then y while it is in cache (the
    whole input is never held as float32); the slice axis z comes last, on the small in-plane result. Runs on
    one thread: these many small products scale poorly (measured 10x slower on two busy cores with two
    threads); ``seg data prepare --workers`` runs cases in parallel instead.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _apply_separable(volume, weights, chunk_voxels)
    finally:
        torch.set_num_threads(threads)


def _apply_separable(volume: np.ndarray, weights: list[np.ndarray], chunk_voxels: int) -> np.ndarray:
    wz, wy, wx = (_Banded(w) for w in weights)
    nz, ny, nx = volume.shape
    out_z, out_y, out_x = (w.shape[0] for w in weights)
    planes = torch.empty(nz, out_y, out_x)
    step = max(1, chunk_voxels // (ny * nx))
    for z0 in range(0, nz, step):
        slab = torch.from_numpy(np.array(volume[z0:z0 + step], dtype=np.float32))
        rows = wx.right(slab.reshape(-1, nx)).reshape(len(slab), ny, out_x)
        planes[z0:z0 + len(slab)] = wy.left(rows)
    return wz.left(planes.reshape(nz, -1)).reshape(out_z, out_y, out_x).numpy()


def vote(labels: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Label-safe resampling of ``labels`` (z, y, x; values 0..255) by non-negative row-normalised ``weights``.

    Each label's one-hot map is resampled (only over the output box it can reach) and every output voxel takes
    the label of highest score; background scores one minus the others' sum; ties go to the lowest label
    (background first). Returns uint8 (z, y, x). Upsampling (at most two neighbouring inputs per output along
    every axis) takes a faster path with the same result: see :func:`_vote_two_taps`.
    """
    labels = np.asarray(labels)
    taps = [_two_taps(w) for w in weights]
    if all(t is not None for t in taps):
        return _vote_two_taps(labels, taps)
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(sitk.GetImageFromArray(labels.astype(np.uint8, copy=False)))
    reach = {}
    for value in (v for v in shapes.GetLabels() if v != 0):
        box = shapes.GetBoundingBox(value)  # x, y, z start then sizes
        inputs = [(box[a], box[a] + box[a + 3]) for a in (2, 1, 0)]
        outputs = []
        for w, (lo, hi) in zip(weights, inputs):
            rows = np.flatnonzero((w[:, lo:hi] > 0).any(axis=1))
            outputs.append((int(rows[0]), int(rows[-1]) + 1))
        reach[value] = inputs, outputs
    out = np.zeros(tuple(w.shape[0] for w in weights), np.uint8)
    if not reach:
        return out
    union = [(min(r[1][a][0] for r in reach.values()), max(r[1][a][1] for r in reach.values())) for a in range(3)]
    best = np.zeros([hi - lo for lo, hi in union], np.float32)
    total, winner = np.zeros_like(best), np.zeros(best.shape, np.uint8)
    for value, (inputs, outputs) in reach.items():
        onehot = labels[tuple(slice(lo, hi) for lo, hi in inputs)] == value
        sub = [w[o0:o1, i0:i1] for w, (i0, i1), (o0, o1) in zip(weights, inputs, outputs)]
        score = apply_separable(onehot, sub)
        region = tuple(slice(o0 - u0, o1 - u0) for (o0, o1), (u0, _) in zip(outputs, union))
        higher = score > best[region]
        best[region][higher] = score[higher]
        winner[region][higher] = value
        total[region] += score
    winner[1 - total >= best] = 0
    out[tuple(slice(lo, hi) for lo, hi in union)] = winner
    return out


def _two_taps(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per row of ``w``: its first non-zero column and the weight of the next column; None unless every row has
    its non-zeros within two neighbouring columns."""
    rows = np.arange(len(w))
    first = (w > 0).argmax(axis=1)
    second = np.minimum(first + 1, w.shape[1] - 1)
    within = w[rows, first] + np.where(second > first, w[rows, second], 0.0)
    if not np.allclose(within, w.sum(axis=1), rtol=0, atol=1e-12):
        return None
    return first, np.where(second > first, w[rows, second], 0.0)


def _vote_two_taps(labels: np.ndarray, taps, slab: int = 8, chunk: int = 1 << 19) -> np.ndarray:
    """:func:`vote` when every output voxel reads 2 x 2 x 2 input voxels (``taps``: per axis the first input
    index and the weight of the second). Where the eight agree (their minimum, taken on the input grid, equals
    their maximum) that is the label; elsewhere each candidate scores the summed trilinear weights of the
    corners holding it: voxel by voxel, or the whole slab at once where most voxels are mixed (a speckled map,
    :class:`_DenseVote`). Output slabs of ``slab`` slices, and mixed voxels ``chunk`` at a time, keep the working
    memory independent of scan length."""
    (z0, tz), (y0, ty), (x0, tx) = taps
    firsts, seconds = (z0, y0, x0), [np.minimum(i + 1, n - 1) for i, n in zip((z0, y0, x0), labels.shape)]
    padded = np.pad(labels, [(0, 1)] * 3, mode="edge")
    shifted = [padded[dz:dz + labels.shape[0], dy:dy + labels.shape[1], dx:dx + labels.shape[2]]
               for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    low = np.minimum.reduce(shifted)  # over each voxel's 2 x 2 x 2 block
    differs = low != np.maximum.reduce(shifted)
    out = np.empty((len(z0), len(y0), len(x0)), np.uint8)
    dense = None
    for start in range(0, len(z0), slab):
        zs = z0[start:start + slab]
        out[start:start + slab] = low[zs][:, y0][:, :, x0]
        mixed = differs[zs][:, y0][:, :, x0]
        count = np.count_nonzero(mixed)
        if not count:
            continue
        if count > mixed.size // 8:  # mostly mixed (a speckled map): score the whole slab densely
            stop = min(start + slab, len(z0))
            dense = dense or _DenseVote(labels, (firsts, seconds), (tz, ty, tx), slab)
            out[start:stop] = dense(start, stop)
            continue
        mixed = np.nonzero(mixed)
        for part in range(0, len(mixed[0]), chunk):
            index = (mixed[0][part:part + chunk] + start, mixed[1][part:part + chunk], mixed[2][part:part + chunk])
            out[index] = _vote_corners(labels, index, firsts, seconds, (tz, ty, tx))
    return out


class _DenseVote:
    """Labels of whole output slabs, every voxel scored from its eight corners, in torch and in-plane first:
    each input slice a slab reads gets its class scores on the output's in-plane grid (bilinear weights, one
    scatter-add per in-plane corner), then each output slice mixes the two input slices around it linearly
    along z. That scatters every input slice once per slab rather than twice per output slice. Buffers are
    reused from slab to slab."""

    def __init__(self, labels: np.ndarray, taps, fractions, slab: int):
        self.source = torch.from_numpy(np.array(labels))  # a small writable copy of the input grid
        (self.z_first, self.z_second), (y_first, y_second), (x_first, x_second) = zip(*taps)  # per axis
        self.tz = fractions[0]
        ty, tx = (torch.from_numpy(t).to(torch.float32) for t in fractions[1:])
        self.corners = [(torch.from_numpy(yi), torch.from_numpy(xi), wy.view(-1, 1) * wx.view(1, -1))
                        for yi, wy in ((y_first, 1 - ty), (y_second, ty))
                        for xi, wx in ((x_first, 1 - tx), (x_second, tx))]
        n = len(self.z_first)
        span = max(np.subtract(*self._input_range(s, min(s + slab, n))[::-1]) for s in range(0, n, slab))
        classes = int(labels.max()) + 1
        self.planes = torch.empty((classes, span, len(ty), len(tx)))
        self.scores = torch.empty((classes, slab, len(ty), len(tx)))

    def _input_range(self, start: int, stop: int) -> tuple[int, int]:
        return int(self.z_first[start:stop].min()), int(self.z_second[start:stop].max()) + 1

    def __call__(self, start: int, stop: int) -> np.ndarray:
        """The labels of output slices ``start:stop``."""
        low, high = self._input_range(start, stop)
        planes, source = self.planes[:, :high - low], self.source[low:high]
        planes.zero_()
        for yi, xi, weight in self.corners:
            corner = source.index_select(1, yi).index_select(2, xi).long()
            planes.scatter_add_(0, corner[None], weight.expand(len(source), -1, -1)[None])
        scores = self.scores[:, :stop - start]
        for j, z in enumerate(range(start, stop)):
            t = float(self.tz[z])
            torch.mul(planes[:, int(self.z_first[z]) - low], 1 - t, out=scores[:, j])
            scores[:, j].add_(planes[:, int(self.z_second[z]) - low], alpha=t)
        return class_argmax(scores, tolerance=1e-6).numpy()  # ties (within float32 rounding): the lowest label


def _vote_corners(labels, index, firsts, seconds, fractions) -> np.ndarray:
    """The labels of the output voxels at ``index`` from their eight corners' trilinear weights."""
    corners, weight = [], torch.ones((len(index[0]), 8), dtype=torch.float64)
    for k in range(8):
        bits = (k >> 2 & 1, k >> 1 & 1, k & 1)
        at = tuple((second if bit else first)[i] for first, second, i, bit in zip(firsts, seconds, index, bits))
        corners.append(torch.from_numpy(labels[at].astype(np.int64)))
        for t, i, bit in zip(fractions, index, bits):
            weight[:, k] *= torch.from_numpy(t[i] if bit else 1 - t[i])
    corners = torch.stack(corners, dim=1)
    score = torch.zeros((len(corners), int(corners.max()) + 1), dtype=torch.float64)
    score.scatter_add_(1, corners, weight)
    top = score >= score.amax(dim=1, keepdim=True) - 1e-9  # ties: the lowest label, background first
    return top.to(torch.uint8).argmax(dim=1).to(torch.uint8).numpy()


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
