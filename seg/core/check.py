"""``seg data check``: find every problem in a dataset before compute is spent on it.

Modelled on nnU-Net's ``--verify_dataset_integrity`` and extended for CT: the layout (see ``seg.core.dataset``),
then every image and label map is read once (headers first, so oversized files are refused before allocation):
unreadable or truncated files, 2D/4D images, implausible spacing, NaN or constant intensities, scans whose
intensities are not CT in HU, label maps on another grid than their image, label values not in ``dataset.json``
and label maps without foreground.

Everything about labeled (and test) cases is fatal. An unreadable unlabeled scan is not: pretraining skips it
and lists it, so one bad file among thousands does not stop a long run. An unlabeled scan the reader accepts
but whose content is bad (not CT, NaN) is fatal, because nothing downstream would skip it. (Truncated NIfTI
files, which ITK would silently pad with zeros, are refused by ``seg.core.io.read_image`` itself.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from rich.markup import escape
from rich.table import Table

from seg.core.dataset import Case, Problem, scan_dataset
from seg.core.errors import DataError
from seg.core.io import Geometry, nifti_truncation, read_image

__all__ = ["Problem", "check_dataset", "image_problems", "label_problems", "nifti_truncation", "render_problems"]

#: The 1st intensity percentile of a CT lies in air (about -1000 HU) or in padding below it.
AIR_PERCENTILE_MAX = -500.0
#: Bulk of a CT in HU (0.1th..99.9th percentile); -3024 and -2048 are common padding values.
HU_RANGE = (-3100.0, 4096.0)
#: Plausible voxel spacing of a CT scan, in mm.
SPACING_RANGE = (0.1, 20.0)
#: Intensity statistics are computed on at most about this many voxels (every n-th slice, row, column).
SAMPLE_VOXELS = 4_000_000


def _sample(array: np.ndarray) -> np.ndarray:
    """A strided subset of a (z, y, x) array with at most about ``SAMPLE_VOXELS`` voxels, as float32."""
    step_xy = 2 if array.shape[1] * array.shape[2] > 300 * 300 else 1
    plane = -(-array.shape[1] // step_xy) * -(-array.shape[2] // step_xy)
    step_z = max(1, -(-array.shape[0] * plane // SAMPLE_VOXELS))
    return np.asarray(array[::step_z, ::step_xy, ::step_xy], dtype=np.float32)


def image_problems(image: sitk.Image) -> list[str]:
    """What makes ``image`` unlike a CT scan in HU: spacing, NaN, constant or non-CT intensities."""
    problems = []
    spacing = image.GetSpacing()
    if not all(SPACING_RANGE[0] <= s <= SPACING_RANGE[1] for s in spacing):
        problems.append(f"implausible voxel spacing {tuple(round(s, 4) for s in spacing)} mm; expected "
                        f"{SPACING_RANGE[0]:g}-{SPACING_RANGE[1]:g} mm")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array.sum(dtype=np.float64)):
        return [*problems, "NaN or infinite intensities"]
    sample = _sample(array)
    if sample.min() == sample.max() and array.min() == array.max():
        return [*problems, f"constant intensity {float(sample.min()):g} (a blank scan)"]
    p01, p1, p999 = np.percentile(sample, [0.1, 1.0, 99.9])
    if p1 > AIR_PERCENTILE_MAX:
        problems.append(f"not CT: 1st intensity percentile is {p1:.0f}, expected air near -1000 HU (an MR scan, "
                        "or CT stored without its rescale slope/intercept?)")
    elif p01 < HU_RANGE[0] or p999 > HU_RANGE[1]:
        problems.append(f"not CT in HU: 0.1th-99.9th intensity percentiles {p01:.0f}..{p999:.0f}, expected within "
                        f"{HU_RANGE[0]:.0f}..{HU_RANGE[1]:.0f}")
    return problems


def _geometry_differences(image: Geometry, label: Geometry) -> list[str]:
    differences = [] if image.size == label.size else [f"size {label.size} vs {image.size}"]
    for field in ("spacing", "origin", "direction"):
        ours, theirs = np.array(getattr(label, field)), np.array(getattr(image, field))
        if not np.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
            differences.append(f"{field} {tuple(np.round(ours, 4).tolist())} vs {tuple(np.round(theirs, 4).tolist())}")
    return differences


def label_values(array: np.ndarray) -> tuple[set, bool]:
    """The distinct values of a label array, and whether they are all integers."""
    if array.dtype.kind in "ui" and array.size and array.min() >= 0 and array.max() < 65536:
        counts = np.zeros(int(array.max()) + 1, dtype=np.int64)
        for start in range(0, array.shape[0], 16):  # bounded temporaries on big volumes
            slab = array[start:start + 16].ravel()
            counts += np.bincount(slab, minlength=counts.size)
        return set(np.flatnonzero(counts).tolist()), True
    values = np.unique(array)
    integral = bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    return set(values.tolist()), integral


def label_problems(label: sitk.Image, allowed: set[int], image: sitk.Image | None = None) -> list[str]:
    """What is wrong with a label map: another grid than ``image``, values outside ``allowed``, no foreground."""
    problems = []
    if image is not None:
        differences = _geometry_differences(Geometry.of(image), Geometry.of(label))
        if differences:
            problems.append("geometry differs from its image: " + "; ".join(differences))
    values, integral = label_values(sitk.GetArrayViewFromImage(label))
    if not integral:
        problems.append("label values are not integers")
    elif allowed and not values <= allowed:
        bad = sorted(values - allowed)
        problems.append(f"label values {bad[:10]} are not in dataset.json labels {sorted(allowed)}")
    if values <= {0}:
        problems.append("empty label map (no foreground voxel)")
    return problems


def _read(path: Path) -> tuple[sitk.Image | None, str]:
    try:
        return read_image(path), ""
    except DataError as exc:
        message = str(exc)
        return None, message[len(str(path)) + 2:] if message.startswith(f"{path}: ") else message


def _check_case(case: Case, allowed: set[int], rel, labeled: bool) -> list[Problem]:
    problems = []
    image, why = _read(case.image)
    if image is None:
        problems.append(Problem(rel(case.image), why if labeled else f"{why} (unlabeled scan: will be skipped)",
                                fatal=labeled))
    else:
        problems += [Problem(rel(case.image), text, True) for text in image_problems(image)]
    if case.label is not None:
        label, why = _read(case.label)
        if label is None:
            problems.append(Problem(rel(case.label), why, True))
        else:
            problems += [Problem(rel(case.label), text, True) for text in label_problems(label, allowed, image)]
    return problems


def check_dataset(root, unlabeled_dir: str = "unlabeled", progress=None) -> list[Problem]:
    """Every problem found in the dataset at ``root`` (empty when it is fine); ``progress(1)`` after each case."""
    root = Path(root)
    try:
        dataset, problems = scan_dataset(root, unlabeled_dir)
    except DataError as exc:
        return [Problem(str(root), str(exc).split(": ", 1)[-1], True)]

    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    allowed = set(dataset.labels.values())
    cases = [(c, True) for c in [*dataset.training, *dataset.test]] + [(c, False) for c in dataset.unlabeled]
    for case, labeled in cases:
        problems += _check_case(case, allowed, rel, labeled)
        if progress is not None:
            progress(1)
    return problems


def render_problems(problems: list[Problem]) -> Table:
    """The problems as a table: file, problem, and whether it is fatal."""
    fatal = sum(p.fatal for p in problems)
    table = Table(title=f"{len(problems)} problem(s), {fatal} fatal", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("problem", overflow="fold")
    table.add_column("fatal")
    for p in problems:
        table.add_row(escape(p.file), escape(p.problem), "[red]yes" if p.fatal else "[yellow]no (skipped)")
    return table
