"""End to end: ``seg predict`` against a reference pipeline a user could assemble from MONAI, side by side.

One synthetic CT of real size (512 x 512 x 130, 0.57 mm pixels, 1.6 mm slices; a phantom from
``seg data synth --size full``, cut or repeated to the slice count) goes through

- ours: ``seg predict`` with the paper-size V-Net from ``seg run finetune --epochs 0`` (experiment
  flare22-pcrl-vnet: crop to the body, 160 x 160 x 2.5 mm, clip and z-score, z sliding window of 80 slices,
  overlap 0.5, Gaussian blending, the inverse back onto the input grid, atomic write);
- the reference: SimpleITK read, third-order B-spline resampling of the whole field of view to 160 x 160
  x 2.5 mm, the same clip and z-score, MONAI's ``VNet`` (widths 16..256, untrained: timing only),
  ``sliding_window_inference`` with the same 80 x 160 x 160 window, overlap 0.5 and Gaussian blending,
  argmax, nearest-neighbour resampling back, SimpleITK write.

Each runs in a fresh process (imports, model loading and all), timed by wall clock; peak memory is that
process's maximum resident set size. A 600-slice scan through ours checks that memory stays nearly flat in
scan length (target: at most 1.2 x the 130-slice peak).

    python benchmarks/bench_predict.py              # about 2 minutes on 2 cores, plus about 2 more with --long
    python benchmarks/bench_predict.py --long 600   # adds the 600-slice memory row
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING = (0.57, 0.57, 1.6)


def make_scan(path: Path, slices: int) -> None:
    """A full-size phantom with identity direction, cut or repeated along z to ``slices`` slices."""
    from seg.core.synth import synthetic_case

    image, _ = synthetic_case(0, 0, True, "full", direction=[1, 0, 0, 0, 1, 0, 0, 0, 1])
    array = sitk.GetArrayFromImage(image)
    if len(array) >= slices:
        start = (len(array) - slices) // 2
        array = array[start:start + slices]
    else:  # mirror-repeat: no seams, anatomy of a (strange) long scan
        period = np.concatenate([np.arange(len(array)), np.arange(len(array))[::-1]])
        array = array[period[np.arange(slices) % len(period)]]
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(SPACING)
    out.SetOrigin((-146.0, -146.0, -100.0))
    sitk.WriteImage(out, str(path), useCompression=True)


def make_model(folder: Path) -> Path:
    """A paper-size fine-tuning run folder from ``seg run finetune --epochs 0`` on two small phantoms."""
    data, run = folder / "data", folder / "run"
    for args in (["data", "synth", str(data), "--labeled", "2", "--unlabeled", "0"],
                 ["run", "finetune", "-e", "flare22-pcrl-vnet", "--data", str(data), "--out", str(run),
                  "--epochs", "0", "--device", "cpu"]):
        subprocess.run([sys.executable, "-m", "seg", "-q", *args], check=True)
    return run


def measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of ``command`` run in its own process."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024


def reference(scan: str, out: str) -> None:
    """The MONAI pipeline (module docstring), for one scan."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import VNet

    image = sitk.ReadImage(scan)
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    new_size = [160, 160, int(round(size[2] * spacing[2] / 2.5))]
    new_spacing = size * spacing / new_size
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - spacing) / 2)  # same field of view
    small = sitk.Resample(image, [int(n) for n in new_size], sitk.Transform(), sitk.sitkBSpline, origin.tolist(),
                          new_spacing.tolist(), image.GetDirection(), -1000.0, sitk.sitkFloat32)
    array = np.clip(sitk.GetArrayFromImage(small), -320, 320)
    array = (array - array.mean()) / max(array.std(), 1e-8)
    network = VNet(spatial_dims=3, in_channels=1, out_channels=14).eval()
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(array)[None, None], roi_size=(80, 160, 160),
                                          sw_batch_size=1, predictor=network, overlap=0.5, mode="gaussian")
    labels = sitk.GetImageFromArray(logits[0].argmax(0).numpy().astype(np.uint8))
    labels.CopyInformation(small)
    back = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(back, out, useCompression=True)


def same_grid(a: Path, b: Path) -> bool:
    """Whether two image files have the same size, spacing, origin and direction."""
    ra, rb = sitk.ImageFileReader(), sitk.ImageFileReader()
    for reader, path in ((ra, a), (rb, b)):
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    return ra.GetSize() == rb.GetSize() and np.allclose(ra.GetSpacing(), rb.GetSpacing()) and \
        np.allclose(ra.GetOrigin(), rb.GetOrigin()) and np.allclose(ra.GetDirection(), rb.GetDirection())


def main() -> None:
    """Build the inputs, run both pipelines, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--long", type=int, default=0, help="also run ours on a scan of this many slices")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest counts")
    parser.add_argument("--reference", nargs=2, metavar=("SCAN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(*args.reference)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = make_model(tmp)
        scans = {args.slices: tmp / f"scan{args.slices}.nii.gz"}
        if args.long:
            scans[args.long] = tmp / f"scan{args.long}.nii.gz"
        for slices, path in scans.items():
            make_scan(path, slices)
        rows = []

        def row(name, slices, command, out):
            best = min((measured(command) for _ in range(args.repeat)), key=lambda r: r[0])
            if not same_grid(out, scans[slices]):
                raise SystemExit(f"{name}: the label map is not on the input's grid")
            rows.append((name, slices, *best))
            out.unlink()
            print(f"{name:10} {slices:4d} slices  {best[0]:7.1f} s  {best[1]:7.0f} MB", flush=True)

        def ours(slices):
            out = tmp / f"ours{slices}.nii.gz"
            row("seg", slices, [sys.executable, "-m", "seg", "-q", "predict", "-i", str(scans[slices]), "-o",
                                str(out), "--model", str(run), "--device", "cpu"], out)

        ours(args.slices)
        out = tmp / "reference.nii.gz"
        row("MONAI", args.slices, [sys.executable, __file__, "--reference", str(scans[args.slices]), str(out)], out)
        if args.long:
            ours(args.long)
    (_, _, ours_s, ours_mb), (_, _, ref_s, ref_mb) = rows[:2]
    print(f"\n512 x 512 x {args.slices} scan, torch threads {os.cpu_count()} cores:")
    print(f"  wall time  seg {ours_s:.1f} s / MONAI {ref_s:.1f} s = {ours_s / ref_s:.2f} (target <= 0.5)")
    print(f"  peak RSS   seg {ours_mb:.0f} MB / MONAI {ref_mb:.0f} MB = {ours_mb / ref_mb:.2f} "
          f"(target: seg <= 2048 MB)")
    if args.long:
        long_mb = rows[2][3]
        print(f"  {args.long} vs {args.slices} slices: seg peak RSS {long_mb:.0f} / {ours_mb:.0f} MB = "
              f"{long_mb / ours_mb:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
