"""Dice and normalized surface Dice (NSD), computed as the FLARE22 challenge's evaluation code computes them.

FLARE22 (github.com/JunMa11/FLARE, ``FLARE22/Evaluation``) uses the surface-distance method of Nikolov et al.
(DeepMind's ``surface-distance``): a mask's surface is made of surface elements ("surfels") that sit on the
corners of the voxel grid. Every corner whose 2x2x2 neighbourhood of voxels is mixed carries a surfel whose
area comes from a 256-entry lookup table on the neighbourhood's bit pattern; distances are Euclidean distances
in mm between surfel corners. NSD at tolerance t is (area of the predicted surface within t of the true surface
+ area of the true surface within t of the predicted one) / (total area of both).

The lookup table is rebuilt here from its geometric definition rather than copied: each neighbourhood's
surface is the marching-cubes surface through the midpoints of the cube edges whose two ends differ, where a
face with two diagonal corners of each kind cuts off the corners of the minority kind (the inside ones when at
most four of the eight are inside), and each resulting polygon is split into triangles the way that gives the
largest total area (the choice the published table makes for the non-planar polygons). With that rule the
areas agree with the published table for every pattern, at any voxel spacing.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import SimpleITK as sitk

#: NSD tolerance in mm per FLARE22 label value.
FLARE22_TOLERANCES: dict[int, float] = {1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0,
                                        10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0}
#: Label values FLARE22 scores only on the axial slices where the ground truth has them (aorta, IVC, esophagus).
FLARE22_SLICE_LIMITED = (5, 6, 10)
#: Evaluation rules: "2022", FLARE22's code as the challenge ran it (the paper's numbers); "2024", the official
#: repository's later rule that scores NSD 0 wherever DSC < ``LOW_DSC`` (the surface is not even computed).
RULES = ("2022", "2024")
LOW_DSC = 0.2

_CORNERS = list(itertools.product((0, 1), repeat=3))
#: Distances within this relative margin of the tolerance are re-decided in float64 (ITK's map is float32).
_BAND = 1e-5


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks; 1.0 when both are empty (FLARE22's rule)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & gt)) / total


def _cell_rings(code: int) -> list[list[tuple]]:
    """The surface polygons (rings of edge midpoints) of one 2x2x2 neighbourhood, bit ``4a+2b+c`` = corner abc."""
    inside = {c: bool(code >> (4 * c[0] + 2 * c[1] + c[2]) & 1) for c in _CORNERS}
    cut_off = sum(inside.values()) <= 4  # on ambiguous faces, separate the corners of the minority kind
    neighbours: dict[tuple, list[tuple]] = {}
    for axis, level in itertools.product(range(3), (0, 1)):
        u, v = (a for a in range(3) if a != axis)
        face = []
        for cu, cv in ((0, 0), (1, 0), (1, 1), (0, 1)):
            corner = [0, 0, 0]
            corner[axis], corner[u], corner[v] = level, cu, cv
            face.append(tuple(corner))
        sides = [(face[i], face[(i + 1) % 4]) for i in range(4)]
        mid = [tuple((p + q) / 2 for p, q in zip(*side)) for side in sides]
        crossing = [i for i, (p, q) in enumerate(sides) if inside[p] != inside[q]]
        if len(crossing) == 2:
            pairs = [(mid[crossing[0]], mid[crossing[1]])]
        elif len(crossing) == 4:
            pairs = [(mid[i - 1], mid[i]) for i, corner in enumerate(face) if inside[corner] == cut_off]
        else:
            pairs = []
        for p, q in pairs:
            neighbours.setdefault(p, []).append(q)
            neighbours.setdefault(q, []).append(p)
    rings, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        ring, current = [start], start
        seen.add(start)
        while (step := [p for p in neighbours[current] if p not in seen]):
            current = step[0]
            ring.append(current)
            seen.add(current)
        rings.append(ring)
    return rings


def _triangulations(ring: list) -> list[list[tuple]]:
    """Every way to split the polygon ``ring`` into triangles (lists of vertex triples)."""
    if len(ring) < 3:
        return [[]]
    return [left + right + [(ring[0], ring[k], ring[-1])]
            for k in range(1, len(ring) - 1)
            for left in _triangulations(ring[:k + 1]) for right in _triangulations(ring[k:])]


@functools.cache
def _surfel_area_vectors() -> np.ndarray:
    """(256, T, 3): per neighbourhood code, each triangle's area vector on the unit grid (zero-padded)."""
    per_code = []
    for code in range(256):
        vectors = []
        for ring in _cell_rings(code):
            options = [np.array([np.cross(np.subtract(q, p), np.subtract(r, p)) / 2 for p, q, r in tri])
                       for tri in _triangulations(ring)]
            vectors.extend(max(options, key=lambda v: np.linalg.norm(v, axis=1).sum()))
        per_code.append(vectors)
    table = np.zeros((256, max(map(len, per_code)), 3))
    for code, vectors in enumerate(per_code):
        table[code, :len(vectors)] = np.reshape(vectors, (-1, 3))
    return table


def surfel_area_table(spacing_mm) -> np.ndarray:
    """Surfel area in mm² for each of the 256 neighbourhood codes (bit ``4a+2b+c`` set = voxel (a, b, c)
    of the 2x2x2 neighbourhood inside), for voxels of ``spacing_mm`` along axes (0, 1, 2)."""
    s0, s1, s2 = (float(s) for s in spacing_mm)
    scaled = _surfel_area_vectors() * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(scaled, axis=2).sum(axis=1)


def corner_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner: shape ``mask.shape + 1``; corner ``i`` lies between voxels
    ``i - 1`` and ``i`` on each axis (outside the array counts as background)."""
    padded = np.pad(np.asarray(mask, bool), 1).astype(np.uint8)
    n0, n1, n2 = (s + 1 for s in np.shape(mask))
    codes = np.zeros((n0, n1, n2), np.uint8)
    for a, b, c in _CORNERS:
        codes |= padded[a:a + n0, b:b + n1, c:c + n2] << np.uint8(4 * a + 2 * b + c)
    return codes


def _mm_lengths(offsets: np.ndarray, spacing) -> np.ndarray:
    """Lengths in mm of integer grid offsets (N, 3), in float64."""
    squares = (offsets * np.asarray(spacing, float)) ** 2
    # summed x, then y, then z, the order of the reference (which holds its arrays as x, y, z)
    return np.sqrt(squares[:, 2] + squares[:, 1] + squares[:, 0])


def _within_tolerance(points: np.ndarray, targets: np.ndarray, spacing, tolerance: float) -> np.ndarray:
    """For each True voxel of ``points`` (in ``np.nonzero`` order): is a True voxel of ``targets`` within
    ``tolerance`` mm? An exact Euclidean distance map (ITK, float32) decides, except for distances within a
    hair of the tolerance, which are re-decided in float64 over the grid offsets of about that length."""
    image = sitk.GetImageFromArray(targets.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    found = sitk.GetArrayViewFromImage(distance)[points]
    within = found <= tolerance
    unsure = np.abs(found - tolerance) <= _BAND * tolerance
    if unsure.any():
        where = np.argwhere(points)[unsure]
        reach = [np.arange(-r, r + 1) for r in (int(tolerance / float(s)) + 1 for s in spacing)]
        offsets = np.stack(np.meshgrid(*reach, indexing="ij"), axis=-1).reshape(-1, 3)
        lengths = _mm_lengths(offsets, spacing)
        hit = np.zeros(len(where), bool)
        for offset in offsets[(lengths <= tolerance) & (lengths >= tolerance * (1 - 4 * _BAND))]:
            other = where + offset
            inside = np.all((other >= 0) & (other < targets.shape), axis=1)
            hit[inside] |= targets[tuple(other[inside].T)]
        within[unsure] = hit
    return within


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, spacing_mm, tolerance_mm: float) -> float:
    """NSD of two boolean masks with voxel spacing ``spacing_mm`` (same axis order as the arrays);
    1.0 when both are empty and 0.0 when only one is (FLARE22's rules)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 3 or len(spacing_mm) != 3:
        raise ValueError(f"masks of shapes {pred.shape} and {gt.shape}, spacing {spacing_mm}: need two 3D "
                         "masks of one shape and three spacings")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred and has_gt):
        return float(has_pred == has_gt)
    box = _bounding_box(pred | gt)
    codes_pred, codes_gt = corner_codes(pred[box]), corner_codes(gt[box])
    surface_pred = (codes_pred != 0) & (codes_pred != 255)
    surface_gt = (codes_gt != 0) & (codes_gt != 255)
    area = surfel_area_table(spacing_mm)
    area_pred, area_gt = area[codes_pred[surface_pred]], area[codes_gt[surface_gt]]
    near_pred = _within_tolerance(surface_pred, surface_gt, spacing_mm, tolerance_mm)
    near_gt = _within_tolerance(surface_gt, surface_pred, spacing_mm, tolerance_mm)
    return float((area_pred[near_pred].sum() + area_gt[near_gt].sum()) / (area_pred.sum() + area_gt.sum()))


def _label_boxes(labels: np.ndarray, values) -> dict[int, list[list[int]]]:
    """Per label value present in ``labels``: its bounding box as [first, last] voxel index per axis."""
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32) if labels.size == 0 or labels.max() <= np.iinfo(t).max)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=dtype))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.Execute(image)
    boxes = {}
    for value in set(stats.GetLabels()) & set(values):
        x, y, z, sx, sy, sz = stats.GetBoundingBox(int(value))
        boxes[value] = [[z, z + sz - 1], [y, y + sy - 1], [x, x + sx - 1]]
    return boxes


def evaluate_case(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing, labels: dict[int, str],
                  tolerances: dict[int, float], slice_limited=FLARE22_SLICE_LIMITED,
                  rule: str = "2022") -> dict[int, tuple[float, float]]:
    """(DSC, NSD) per label value of two label arrays whose axis 0 is the axial (slice) axis.

    FLARE22's rules: a label absent from both scores (1, 1), absent from the ground truth only (0, 0); for the
    values in ``slice_limited`` both arrays are cut to the ground truth's axial extent first, exactly as the
    reference does it: slices ``first`` to ``last - 1`` (its upper bound is exclusive), the single slice when
    ``first == last`` (where the reference fails on an empty array). ``rule`` "2024" also scores NSD 0 where
    DSC < 0.2 (see ``RULES``).
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if 0 in labels:
        raise ValueError("label value 0 is the background and cannot be scored")
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"label arrays of shapes {pred_labels.shape} and {gt_labels.shape}")
    for name, array in (("prediction", pred_labels), ("ground truth", gt_labels)):
        if array.dtype.kind not in "iub" or (array.size and (array.min() < 0 or array.max() >= 2 ** 32)):
            raise ValueError(f"{name} labels must be non-negative integers below 2**32 (got {array.dtype})")
    boxes_pred, boxes_gt = _label_boxes(pred_labels, labels), _label_boxes(gt_labels, labels)
    scores = {}
    for value in labels:
        box_pred, box_gt = boxes_pred.get(value), boxes_gt.get(value)
        if box_gt is None:
            scores[value] = (1.0, 1.0) if box_pred is None else (0.0, 0.0)
            continue
        box = [[min(p[0], g[0]), max(p[1], g[1])] for p, g in zip(box_pred or box_gt, box_gt)]
        if value in slice_limited:
            first, last = box_gt[0]
            box[0] = [max(box[0][0], first), min(box[0][1], max(last - 1, first))]
        window = tuple(slice(lo, hi + 1) for lo, hi in box)
        pred, gt = pred_labels[window] == value, gt_labels[window] == value
        dsc = dice(pred, gt)
        if rule == "2024" and dsc < LOW_DSC:
            scores[value] = (dsc, 0.0)
        else:
            scores[value] = (dsc, normalized_surface_dice(pred, gt, spacing, tolerances[value]))
    return scores
