"""Test-time mirroring (the inferers' ``mirror`` option): what it costs and what it changes, on a trained model.

Trains a phantom model here (``seg data synth`` + ``seg run finetune --experiment phantom-scratch-vnet``,
its own recipe unless ``--epochs``; or takes ``--model RUN`` with ``--data`` holding imagesTs/labelsTs), then segments the held-out
phantoms through the full ``seg predict`` path (preprocessing, inferer, inverse onto the original grid) with
each mirror setting, and prints per setting: network passes per window, seconds per case (best of
``--repeat``), the time ratio to no mirroring, and Dice against the ground truth on the original grid (mean
over the organs present in each case, then over cases; the paired left/right organs apart, since a flip
along x puts each where the other belongs).

    python benchmarks/bench_mirroring.py                                    # the real run (unmeasured; est. 20-30 min on 2 cores)
    python benchmarks/bench_mirroring.py --labeled 2 --test 1 --epochs 1    # checks the script (3-4 minutes)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk
import torch

PAIRED = ("right_kidney", "left_kidney", "right_adrenal_gland", "left_adrenal_gland")


def _seg(*args) -> None:
    subprocess.run([sys.executable, "-m", "seg", "-q", *map(str, args)], check=True)


def train(root: Path, labeled: int, test: int, epochs: int | None, seed: int) -> tuple[Path, Path]:
    """A phantom dataset with held-out cases, and a phantom-scratch-vnet model fine-tuned on it."""
    data, run = root / "data", root / "run"
    _seg("data", "synth", data, "--labeled", labeled, "--unlabeled", 0, "--test", test, "--seed", seed)
    started = time.perf_counter()
    _seg("run", "finetune", "-e", "phantom-scratch-vnet", "--data", data, "--out", run, "--device", "cpu",
         *([] if epochs is None else ["--epochs", epochs]))
    print(f"trained phantom-scratch-vnet ({'its recipe' if epochs is None else f'{epochs} epochs'}) on {labeled} "
          f"phantoms in {time.perf_counter() - started:.0f} s", flush=True)
    return data, run


def dice_scores(pred: np.ndarray, truth: np.ndarray, organs: dict[str, int]) -> dict[str, float]:
    """Dice of every organ present in ``truth``."""
    from seg.core.metrics import dice

    return {name: dice(pred == value, truth == value) for name, value in organs.items() if (truth == value).any()}


def measure(predictor, mirror: list[str], cases, organs, repeat: int) -> dict:
    """Seconds per case (best of ``repeat``) and Dice per case and organ with ``mirror``."""
    mirrored = attrs.evolve(predictor, inferer=attrs.evolve(predictor.inferer, mirror=mirror))
    seconds, scores = [], []
    for image, truth in cases:
        best = None
        for _ in range(repeat):
            started = time.perf_counter()
            labels = mirrored.labels_for(image)
            elapsed = time.perf_counter() - started
            best = elapsed if best is None else min(best, elapsed)
        seconds.append(best)
        scores.append(dice_scores(sitk.GetArrayFromImage(labels), truth, organs))
    return {"seconds": float(np.mean(seconds)), "scores": scores}


def _mean(scores: list[dict], names=None) -> float:
    per_case = [np.mean([v for k, v in s.items() if names is None or k in names]) for s in scores
                if any(names is None or k in names for k in s)]
    return float(np.mean(per_case)) if per_case else float("nan")


def main() -> None:
    """Train (or load) a model, segment the held-out phantoms with each mirror setting, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a fine-tuning run to use instead of training one (needs --data)")
    parser.add_argument("--data", help="dataset whose imagesTs/labelsTs are the test cases (with --model)")
    parser.add_argument("--labeled", type=int, default=8, help="training phantoms")
    parser.add_argument("--test", type=int, default=6, help="held-out phantoms")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mirrors", default="none,x,y,z,xyz", help="comma-separated settings: none, or axes")
    parser.add_argument("--repeat", type=int, default=2, help="timings per case and setting; the best counts")
    args = parser.parse_args()
    if bool(args.model) != bool(args.data):
        parser.error("--model and --data go together")
    from seg.core.console import set_quiet
    from seg.core.predict import load_predictor

    set_quiet(True)
    settings = [[] if s == "none" else list(s) for s in args.mirrors.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data, run = (Path(args.data), Path(args.model)) if args.model else \
            train(Path(tmp), args.labeled, args.test, args.epochs, args.seed)
        predictor = load_predictor(run, device="cpu", precision="fp32")
        organs = {name: value for name, value in predictor.labels.items() if value != 0}
        cases = []
        for image_path in sorted((data / "imagesTs").glob("*_0000.nii.gz")):
            truth_path = data / "labelsTs" / image_path.name.replace("_0000.nii.gz", ".nii.gz")
            cases.append((sitk.ReadImage(str(image_path)), sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path)))))
        if not cases:
            raise SystemExit(f"{data / 'imagesTs'}: no test cases")
        predictor.labels_for(cases[0][0])  # warm-up (kernel selection, first-touch memory): no row pays it
        rows = [(mirror, measure(predictor, mirror, cases, organs, args.repeat)) for mirror in settings]
    base = rows[0][1]
    print(f"\n{len(cases)} held-out phantoms, {torch.get_num_threads()} torch threads, inferer "
          f"{type(predictor.inferer).__name__}; Dice: mean over organs present, then cases")
    print(f"{'mirror':8} {'passes':>6} {'s/case':>7} {'time ratio':>10} {'Dice':>6} {'vs none':>8} "
          f"{'L/R organs':>10} {'others':>7}")
    for mirror, result in rows:
        others = [name for name in organs if name not in PAIRED]
        print(f"{''.join(mirror) or 'none':8} {2 ** len(mirror):6d} {result['seconds']:7.2f} "
              f"{result['seconds'] / base['seconds']:10.2f} {_mean(result['scores']):6.3f} "
              f"{_mean(result['scores']) - _mean(base['scores']):+8.3f} {_mean(result['scores'], PAIRED):10.3f} "
              f"{_mean(result['scores'], others):7.3f}")


if __name__ == "__main__":
    main()
