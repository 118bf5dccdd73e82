"""Resampling arithmetic of the ``resample`` step: separable interpolation matrices and label-safe voting.

Interpolating from samples f_k is linear, so along one axis it is a matrix W (out x in), and a 3D resample with a
separable kernel is three matrix products. Cubic B-spline: W = E P^-1 G, where G Gaussian-smooths (anti-aliasing),
P^-1 turns samples into B-spline coefficients (the interpolation condition f_i = sum_k c_k b3(i - k)) and E
evaluates the spline at the output positions. Borders mirror about the edge voxel (d c b | a b c d | c b a), as
ITK's B-spline interpolator and scipy.ndimage's mode="mirror" do. The weights decay fast away from each output
position, so W is applied in blocks of rows, each touching a short range of columns.

Label maps are never interpolated as numbers: :func:`vote` interpolates each label's one-hot map with the
(linear) weights and keeps the label of highest score.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from seg.core.inference import class_argmax


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
        span = max(high - low for low, high in (self._input_range(s, min(s + slab, n)) for s in range(0, n, slab)))
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
    return class_argmax(score.T, tolerance=1e-9).numpy()  # ties: the lowest label, background first
