"""Preprocessing speed: the paper's whole chain into the cache, against just reading the scan, side by side.

A synthetic 512 x 512 x 130 CT (0.57 mm pixels, 1.6 mm slices, int16 .nii.gz): a body-like ellipse with smooth
organs, a separate table and noise, written twice: stored RAS (as the real example_ct; reorient must flip x
and y) and stored LPS (nothing to flip). Timed in this one process, ``--repeat`` interleaved rounds (median
and best), each ratio against reading the same file:

- read: ``SimpleITK.ReadImage`` (decompressing the file), the floor any preprocessing pays;
- prepare: ``seg.core.cache.prepare`` of that case (read, the four steps, write the cache entry), with the
  steps in the registry's order and with crop and resample first (same result, flips on the small grid);
- SimpleITK B-spline: ``sitk.Resample`` with ``sitkBSpline`` (3rd order) straight to 160 x 160 x 83, the
  read image already in memory.

Also printed: how far seg's resampler (anti-aliasing off) is from SimpleITK's B-spline on the same grid.
Target: whole preprocessing <= 1.5 x the read time. Run: ``python benchmarks/bench_preprocess.py``.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk

from seg.core import cache
from seg.core.config import load_experiment
from seg.core.io import Geometry
from seg.core.preprocessing import Sample, build_pipeline, run_pipeline
from seg.plugins.preprocess import Resample

#: The paper's steps as the ``flare22-pcrl-vnet`` experiment of seg/registry.toml lists them.
STEPS = [(c.name, dict(c.options)) for c in load_experiment("flare22-pcrl-vnet").preprocess]
_BY_NAME = dict(STEPS)
#: The same steps, same result (crop and resample commute with reorient), with the flips on the small grid.
FAST = [(name, _BY_NAME.get(name, {})) for name in ("crop_body", "resample", "reorient", "clip_zscore")]


@attrs.frozen
class _Case:
    name: str
    image: Path
    label: Path | None = None


def phantom(size=(512, 512, 130), spacing=(0.57, 0.57, 1.6), seed=0, stored: str = "RAS") -> sitk.Image:
    """A body-like int16 CT: air, an elliptic body with smooth organs, a table below it, Gaussian noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])), indexing="ij",
                          sparse=True)
    cx, cy = size[0] * spacing[0] / 2, size[1] * spacing[1] / 2
    body = ((x - cx) / 150) ** 2 + ((y - cy) / 105) ** 2 < 1
    organs = 60 * np.sin(x / 25) * np.cos(y / 18) + 20 * np.sin(z / 35)
    hu = np.where(body, 30 + organs, -1000.0)
    hu = np.where((np.abs(y - cy - 125) < 5) & (np.abs(x - cx) < 180), 200.0, hu)  # the table
    hu = hu + rng.normal(0, 15, (size[2], size[1], size[0]))
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((0.0, 0.0, -100.0))
    return sitk.DICOMOrient(image, stored)  # the same voxels, stored in another axis order


def interleaved_times(functions: dict, repeat: int) -> dict[str, list[float]]:
    """Wall times of each function, ``repeat`` rounds, one call of each per round (so a busy spell on a
    shared machine hits all of them alike)."""
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def sitk_bspline(image: sitk.Image, grid: Geometry) -> sitk.Image:
    """SimpleITK's plain 3rd-order B-spline resampling of ``image`` onto ``grid``."""
    return sitk.Resample(image, grid.size, sitk.Transform(), sitk.sitkBSpline, grid.origin, grid.spacing,
                         grid.direction, 0.0, sitk.sitkFloat32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        cases = {}
        for stored in ("RAS", "LPS"):
            cases[stored] = _Case(stored, work / f"{stored}_0000.nii.gz")
            sitk.WriteImage(phantom(stored=stored), str(cases[stored].image), useCompression=True)

        fresh = itertools.count()

        def prepare_once(stored, steps):
            cache.prepare([cases[stored]], work / f"cache{next(fresh)}", steps)

        image = sitk.ReadImage(str(cases["RAS"].image))
        pipeline = build_pipeline(FAST)
        inputs = [run_pipeline(pipeline[:i], Sample(image))[0] for i in range(len(pipeline))]
        rows = {
            "read RAS-stored file (sitk.ReadImage)": lambda: sitk.ReadImage(str(cases["RAS"].image)),
            "prepare RAS file, registry order": lambda: prepare_once("RAS", STEPS),
            "prepare RAS file, crop+resample first": lambda: prepare_once("RAS", FAST),
            **{f"  step {name}": (lambda step=step, sample=sample: step(sample))
               for (name, _), step, sample in zip(FAST, pipeline, inputs)},
            "read LPS-stored file (sitk.ReadImage)": lambda: sitk.ReadImage(str(cases["LPS"].image)),
            "prepare LPS file, registry order": lambda: prepare_once("LPS", STEPS),
            "prepare LPS file, crop+resample first": lambda: prepare_once("LPS", FAST),
        }
        times = interleaved_times(rows, args.repeat)
        reoriented = run_pipeline(build_pipeline(STEPS[:2]), Sample(image))[0].image
        grid = Resample().grid(Geometry.of(reoriented))[0]
        times["SimpleITK sitkBSpline resample only (no read)"] = interleaved_times(
            {"plain": lambda: sitk_bspline(reoriented, grid)}, max(1, args.repeat // 3))["plain"]

        ours = Resample(antialias=False)(Sample(reoriented))[0].image
        difference = np.abs(sitk.GetArrayFromImage(ours) - sitk.GetArrayFromImage(sitk_bspline(reoriented, grid)))
        cache.prepare([cases["RAS"]], work / "cache", STEPS)
        shape = cache.load(work / "cache", "RAS").image.shape
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"CT {image.GetSize()} int16, spacing {tuple(round(s, 3) for s in image.GetSpacing())} mm -> cache "
          f"{shape[::-1]} {np.dtype(cache.IMAGE_DTYPE).name}; {args.repeat} interleaved rounds")
    print(f"{'what (ratios: to the read of the same file)':<46}{'median s':>9}{'x read':>8}{'best s':>9}{'x read':>8}")
    for label, values in times.items():
        read = times["read LPS-stored file (sitk.ReadImage)" if "LPS" in label else
                     "read RAS-stored file (sitk.ReadImage)"]
        print(f"{label:<46}{statistics.median(values):>9.3f}{statistics.median(values) / statistics.median(read):>8.2f}"
              f"{min(values):>9.3f}{min(values) / min(read):>8.2f}")
    for label, whole in times.items():
        if label.startswith("prepare"):
            read = times[f"read {label.split()[1]}-stored file (sitk.ReadImage)"]
            ratios = [w / r for w, r in zip(whole, read)]
            print(f"whole preprocessing / read, {label[8:]:<32}: median {statistics.median(ratios):.2f} per round, "
                  f"best {min(whole) / min(read):.2f} (target <= 1.5)")
    print(f"seg resampler (antialias off) vs sitkBSpline on the same grid: max |diff| {difference.max():.4f} HU, "
          f"mean {difference.mean():.5f} HU")


if __name__ == "__main__":
    main()
