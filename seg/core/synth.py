"""Synthetic abdominal CT phantoms with the 13 FLARE22 organs, written as an nnU-Net v2 dataset.

The anatomy (``seg.core.phantom``) is laid out in patient millimetres for a reference adult, then scaled, moved
and deformed per case by smooth random fields drawn on coarse lattices. This module renders it on an
axis-aligned grid with per-case spacing, field of view and scan range, blurred (partial volume), given texture
and noise, and finally stored with a random image direction (flips, axis permutations, a few oblique) that
keeps its physical geometry: int16 HU, label map (uint8) on the same grid. Every draw comes from a seed, so
the same seed writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from seg.core.dataset import FLARE22_LABELS, write_dataset_json
from seg.core.errors import ConfigError, DataError
from seg.core.io import write_image
from seg.core.phantom import Canvas, Phantom, SmoothField, gaussian_blur

SIZES = ("small", "full")


def _scan_range(rng: np.random.Generator, labeled: bool, size: str) -> tuple[float, float]:
    """Bottom and top of the scan (reference mm). Labeled scans cover every organ; some reach into the chest
    and pelvis; a quarter of the unlabeled ones are partial (the field of view cuts the abdomen)."""
    if not labeled and rng.random() < 0.25:
        length = rng.uniform(100, 180)
        bottom = rng.uniform(-200, 200 - length)
        return bottom, bottom + length
    bottom, top = rng.uniform(-130, -85), rng.uniform(115, 150)
    if rng.random() < 0.3:  # longer than the abdomen
        if size == "small":
            bottom, top = bottom - rng.uniform(0, 25), top + rng.uniform(0, 35)
        else:
            bottom, top = rng.uniform(-280, -150), rng.uniform(200, 320)
    return bottom, top


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """A direction matrix (columns: physical directions of the index axes) as CT files come: mostly RAS or
    LPS on disk, some with reversed slices or permuted axes, a few slightly oblique (gantry tilt)."""
    r = rng.random()
    flips = [True, True, False] if r < 0.45 or (r >= 0.88 and rng.random() < 0.5) else [False, False, False]
    perm = [0, 1, 2]
    if 0.70 <= r < 0.80:
        flips = [bool(rng.random() < 0.5), bool(rng.random() < 0.5), True]
    elif 0.80 <= r < 0.88:
        while perm == [0, 1, 2]:
            perm = [int(i) for i in rng.permutation(3)]
        flips = [bool(f) for f in rng.random(3) < 0.5]
    signed = np.zeros((3, 3))
    for j, (axis, flip) in enumerate(zip(perm, flips)):
        signed[axis, j] = -1.0 if flip else 1.0
    if r < 0.88:
        return signed
    axis = np.array([1.0, 0, 0]) if rng.random() < 0.6 else rng.normal(size=3)
    return _rotation(axis, np.deg2rad(rng.uniform(2, 8))) @ signed


def _rotation(axis, angle: float) -> np.ndarray:
    """Rotation matrix about ``axis`` by ``angle`` radians (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _split_direction(direction) -> tuple[list[int], list[bool], np.ndarray]:
    """Write ``direction`` = rotation @ signed permutation: (permutation, flips, rotation)."""
    d = np.asarray(direction, float).reshape(3, 3)
    perm = [int(np.argmax(np.abs(d[:, j]))) for j in range(3)]
    if sorted(perm) != [0, 1, 2] or abs(abs(np.linalg.det(d)) - 1) > 1e-3:
        raise ConfigError(f"direction {tuple(np.round(d.ravel(), 3))}: not an orthonormal image direction")
    flips = [bool(d[perm[j], j] < 0) for j in range(3)]
    signed = np.zeros((3, 3))
    for j in range(3):
        signed[perm[j], j] = -1.0 if flips[j] else 1.0
    return perm, flips, d @ signed.T


def _reorder(image: sitk.Image, perm, flips) -> sitk.Image:
    """The same image in space, its index axes permuted (new axis j = old axis perm[j]) and flipped."""
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).transpose(perm)  # index order x, y, z
    array = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    old = np.array(image.GetDirection()).reshape(3, 3)
    corner = [0, 0, 0]
    for p, f in zip(perm, flips):
        corner[p] = image.GetSize()[p] - 1 if f else 0
    out = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    out.SetSpacing([image.GetSpacing()[p] for p in perm])
    out.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    out.SetDirection(np.stack([old[:, p] * (-1 if f else 1) for p, f in zip(perm, flips)], axis=1).ravel().tolist())
    return out


def _grid(rng: np.random.Generator, size: str, labeled: bool, phantom: Phantom):
    """In-plane voxel centres (xs, ys), slice centres zs (mm, body centre at 0) and slice thickness."""
    if size == "small":
        n = int(rng.integers(96, 129))
        spacing = rng.uniform(300, 420) / n
    else:
        n, spacing = 512, rng.uniform(0.7, 0.9)
    bottom, top = np.multiply(_scan_range(rng, labeled, size), phantom.scale[2])
    thickness = rng.uniform(2.0, 5.0) if size == "small" else rng.uniform(1.5, 5.0)
    slices = int(round((top - bottom) / thickness))
    if size == "small":
        slices = int(np.clip(slices, 20, 64))
    thickness = (top - bottom) / slices
    centre = rng.uniform(-20, 20, 2)
    xs, ys = (c + (np.arange(n) - (n - 1) / 2) * spacing for c in centre)
    zs = bottom + (np.arange(slices) + 0.5) * thickness
    return xs.astype(np.float32), ys.astype(np.float32), zs.astype(np.float32), float(spacing), float(thickness)


def _render(phantom: Phantom, xs, ys, zs, fields, noise: np.random.Generator, sigma: float, slab: int):
    """HU (int16, after partial-volume blur and noise) and labels on the axis-aligned grid, slab by slab."""
    hu = np.empty((len(zs), len(ys), len(xs)), np.int16)
    label = np.empty(hu.shape, np.uint8)
    halo = 2
    for k0 in range(0, len(zs), slab):
        k1, a = min(len(zs), k0 + slab), max(0, k0 - halo)
        canvas = Canvas(xs, ys, zs[a:k1 + halo], fields)
        phantom.render(canvas)
        blurred = gaussian_blur(canvas.hu, 0.45)[k0 - a:k1 - a]
        blurred += sigma * noise.standard_normal(blurred.shape, dtype=np.float32)
        hu[k0:k1] = np.clip(np.rint(blurred), -1024, 3071)
        label[k0:k1] = canvas.label[k0 - a:k1 - a]
    return hu, label


def synthetic_case(seed: int, index: int = 0, labeled: bool = True, size: str = "small",
                   direction=None) -> tuple[sitk.Image, sitk.Image]:
    """Phantom ``index`` of the dataset drawn from ``seed``: (CT image int16 HU, label map uint8, same grid).

    ``direction`` (9 numbers, columns the index axes' physical directions) replaces the random one; the
    anatomy and its physical position do not depend on it.
    """
    if size not in SIZES:
        raise ConfigError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    streams = np.random.SeedSequence([int(seed), int(not labeled), int(index)]).spawn(5)
    anatomy, grid, orient, field_rng, noise = (np.random.default_rng(s) for s in streams)
    phantom = Phantom(anatomy)
    xs, ys, zs, spacing, thickness = _grid(grid, size, labeled, phantom)
    sigma = grid.uniform(4, 14) if size == "small" else grid.uniform(10, 30)
    pad = grid.choice([-1000, -1024, -3024], p=[0.6, 0.25, 0.15])
    position = np.array([grid.uniform(-40, 40), grid.uniform(-40, 40), grid.uniform(-900, 100)])
    lo, hi = (xs[0], ys[0], zs[0]), (xs[-1], ys[-1], zs[-1])
    fields = {name: SmoothField(field_rng, lo, hi, scale) for name, scale in
              (("shape", 25.0), ("bowel", 12.0), ("texture", 6.0))}
    direction = _random_direction(orient) if direction is None else direction
    perm, flips, rotation = _split_direction(direction)
    oblique = not np.allclose(rotation, np.eye(3), atol=1e-6)
    fov = len(xs) * spacing
    margin = int(np.ceil(0.71 * fov * np.linalg.norm(rotation - np.eye(3), 2) / thickness)) + 1 if oblique else 0
    render_zs = np.concatenate([zs[0] - thickness * np.arange(margin, 0, -1), zs,
                                zs[-1] + thickness * np.arange(1, margin + 1)]).astype(np.float32)
    hu, label = _render(phantom, xs, ys, render_zs, fields, noise, sigma, 64 if size == "small" else 24)
    if pad != -1000:  # scanners fill outside the reconstruction circle with a padding value
        circle = (xs[None, :] - xs.mean()) ** 2 + (ys[:, None] - ys.mean()) ** 2 > (fov / 2) ** 2
        hu[:, circle] = pad
    images = []
    for array in (hu, label):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((spacing, spacing, thickness))
        image.SetOrigin(tuple(float(v) for v in position + (xs[0], ys[0], render_zs[0])))
        images.append(image)
    if oblique:
        centre = position + (xs.mean(), ys.mean(), zs.mean())
        half = np.array([(len(xs) - 1) * spacing, (len(ys) - 1) * spacing, (len(zs) - 1) * thickness]) / 2
        resample = sitk.ResampleImageFilter()
        resample.SetSize((len(xs), len(ys), len(zs)))
        resample.SetOutputSpacing((spacing, spacing, thickness))
        resample.SetOutputDirection(rotation.ravel().tolist())
        resample.SetOutputOrigin(tuple(float(v) for v in centre - rotation @ half))
        resample.SetDefaultPixelValue(float(pad))
        resample.SetInterpolator(sitk.sitkLinear)
        resample.SetOutputPixelType(sitk.sitkFloat32)
        moved = resample.Execute(images[0])
        images[0] = sitk.Cast(sitk.Round(moved), sitk.sitkInt16)
        resample.SetDefaultPixelValue(0)
        resample.SetInterpolator(sitk.sitkNearestNeighbor)
        resample.SetOutputPixelType(sitk.sitkUInt8)
        images[1] = resample.Execute(images[1])
    return _reorder(images[0], perm, flips), _reorder(images[1], perm, flips)


TEST_INDEX = 100_000  # test phantoms are drawn from their own indices: the same whatever --labeled is


def write_synthetic_dataset(out, labeled: int, unlabeled: int, seed: int = 0, size: str = "small",
                            progress=None, test: int = 0) -> Path:
    """Write ``labeled`` phantoms (imagesTr + labelsTr), ``unlabeled`` ones (unlabeled/) and ``test`` held-out
    labeled ones (imagesTs + labelsTs) to the new or empty folder ``out``, with a dataset.json naming the 13
    FLARE22 organs; ``progress(1)`` after each case."""
    if min(labeled, unlabeled, seed, test) < 0:
        raise ConfigError(f"--labeled {labeled}, --unlabeled {unlabeled}, --test {test}, --seed {seed}: "
                          "must not be negative")
    if size not in SIZES:
        raise ConfigError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; give a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out}: cannot create the folder ({exc.strerror or exc})") from None
    for i in range(labeled):
        image, label = synthetic_case(seed, i, True, size)
        write_image(image, out / "imagesTr" / f"synth_{i:04d}_0000.nii.gz")
        write_image(label, out / "labelsTr" / f"synth_{i:04d}.nii.gz")
        if progress is not None:
            progress(1)
    for i in range(unlabeled):
        image, _ = synthetic_case(seed, i, False, size)
        write_image(image, out / "unlabeled" / f"synth_unlabeled_{i:04d}_0000.nii.gz")
        if progress is not None:
            progress(1)
    for i in range(test):
        image, label = synthetic_case(seed, TEST_INDEX + i, True, size)
        write_image(image, out / "imagesTs" / f"synth_test_{i:04d}_0000.nii.gz")
        write_image(label, out / "labelsTs" / f"synth_test_{i:04d}.nii.gz")
        if progress is not None:
            progress(1)
    write_dataset_json(out, FLARE22_LABELS, labeled, extra={
        "name": "SyntheticAbdomenCT", "description": f"synthetic CT phantoms (seg data synth, seed {seed}, {size})",
        "numUnlabeled": unlabeled, "numTest": test})
    return out
