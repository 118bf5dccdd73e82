"""How long ``seg evaluate`` takes for one real-size case (DSC and NSD of 13 organs, FLARE22 rules).

The ground truth is the label map of a ``seg data synth --size full`` phantom (seed 0, case 0: 512 x 512,
identity direction) cut or mirror-repeated along z to ``--slices`` slices; the prediction is the same map
shifted by ``--shift`` voxels along x, so every organ overlaps imperfectly and its surface is scored. Prints
the wall time of ``seg evaluate`` in a fresh process (imports and reading included) and of
``evaluate_folders`` alone (reading included), the fastest of ``--repeat`` runs each.

    python benchmarks/bench_evaluate.py            # 512 x 512 x 130: under a minute on 2 cores
    python benchmarks/bench_evaluate.py --quick    # a small phantom: checks the script
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IDENTITY = [1, 0, 0, 0, 1, 0, 0, 0, 1]


def make_case(folder: Path, slices: int, shift: int, size: str) -> tuple[Path, Path, int]:
    """``folder/gt/case.nii.gz`` and ``folder/pred/case.nii.gz`` (module docstring); the organs present."""
    from seg.core.synth import synthetic_case

    _, label = synthetic_case(0, 0, True, size, direction=IDENTITY)
    array = sitk.GetArrayFromImage(label)
    period = np.concatenate([np.arange(len(array)), np.arange(len(array))[::-1]])
    start = max(0, (len(array) - slices) // 2)
    array = array[period[(start + np.arange(slices)) % len(period)]]
    for name, values in (("gt", array), ("pred", np.roll(array, shift, axis=2))):
        (folder / name).mkdir()
        out = sitk.GetImageFromArray(np.ascontiguousarray(values))
        out.SetSpacing(label.GetSpacing())
        sitk.WriteImage(out, str(folder / name / "case.nii.gz"), useCompression=True)
    return folder / "pred", folder / "gt", len(np.unique(array)) - 1


def main() -> None:
    """Make the case, time both ways, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--shift", type=int, default=2, help="voxels the prediction is shifted along x")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="a small phantom")
    args = parser.parse_args()
    from seg.core.evaluate import evaluate_folders

    with tempfile.TemporaryDirectory() as tmp:
        pred, gt, organs = make_case(Path(tmp), args.slices, args.shift, "small" if args.quick else "full")
        size = sitk.ReadImage(str(gt / "case.nii.gz")).GetSize()
        command = [sys.executable, "-m", "seg", "-q", "evaluate", "--pred", str(pred), "--gt", str(gt)]
        cli, alone = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"seg evaluate failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            cli.append(time.perf_counter() - start)
            start = time.perf_counter()
            report = evaluate_folders(pred, gt)
            alone.append(time.perf_counter() - start)
    mean = report.overall()
    print(f"one case of {size[0]} x {size[1]} x {size[2]} voxels, {organs} organs, prediction shifted {args.shift} "
          f"voxels (mean DSC {mean['dsc']:.3f}, NSD {mean['nsd']:.3f}): seg evaluate {min(cli):.1f} s (fresh "
          f"process), evaluate_folders {min(alone):.1f} s")


if __name__ == "__main__":
    main()
