"""Time to accuracy of fine-tuning: the phantom recipe against the paper's optimisation, side by side.

Both arms fine-tune the same network (the experiment's backbone and preprocessing) from the same
initialisation on the same phantoms (``--labeled`` cases: a quarter of them validate), for the same
number of steps, in fresh processes with the same thread count. What differs is only the training recipe:

- ``recipe``: the experiment as registered (``phantom-scratch-vnet``: Dice + CE, Adam 2e-3 with warm-up and
  polynomial decay, class-aware patches, spatial and intensity augmentation);
- ``paper``: the paper's fine-tuning settings at the same scale: generalized Dice + CE, Adam 1e-4,
  MultiStepLR (gamma 0.5) at 5 %, 10 % and 25 % of training (the paper's 100, 200 and 500 of 2000
  epochs), no augmentation, the paper's foreground patches;
- ablations of the recipe, one choice undone each: ``no-class-sampling`` (``class_share = 0``),
  ``no-augmentation``, ``per-sample-dice`` (Dice per sample with background, instead of over the batch).

Printed per arm, from each run's metrics.json: the training CPU-seconds (process CPU time of the training
steps, validation excluded) and wall seconds until validation mean Dice first reached 0.5 and 0.7, the best
and final validation mean Dice, the gain over the last quarter of training (as the study report measures it:
the best score after 3/4 of the epochs minus the best before; converged: < 1 point), and the
share of step time spent waiting for data; then each arm's held-out test Dice (``seg predict`` +
``seg evaluate`` on ``--test`` phantoms) for the five large organs and the mean.

    python benchmarks/bench_convergence.py                    # both arms, ~40 min on 2 quiet cores
    python benchmarks/bench_convergence.py --arms recipe      # one arm
    python benchmarks/bench_convergence.py --quick            # smoke-size check that it runs (1 min)

Runs are kept under ``--work`` (default ``bench-convergence/``) and reused when complete, so an interrupted
benchmark resumes (``seg run finetune --resume``) rather than starting over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from seg.core.convergence import history_gain

LARGE = {"liver": 1, "right_kidney": 2, "spleen": 3, "stomach": 11, "left_kidney": 13}
SMALL = {"right_adrenal_gland": 7, "left_adrenal_gland": 8, "gallbladder": 9, "esophagus": 10, "pancreas": 4,
         "duodenum": 12}


def paper_settings(epochs: int) -> list[str]:
    """``--set`` overrides for the paper's fine-tuning optimisation at ``epochs`` epochs."""
    milestones = sorted({max(1, round(epochs * f)) for f in (0.05, 0.10, 0.25)})
    return ["finetune.loss.name=\"gdice_ce\"", "finetune.optimizer.name=\"adam\"", "finetune.optimizer.lr=1e-4",
            "finetune.scheduler.name=\"multistep\"", f"finetune.scheduler.milestones={milestones}",
            "finetune.scheduler.gamma=0.5", "finetune.scheduler.warmup_epochs=0", "finetune.class_share=0.0",
            "finetune.augment={}"]


ABLATIONS = {
    "no-class-sampling": ["finetune.class_share=0.0"],
    "no-augmentation": ["finetune.augment={}"],
    "per-sample-dice": ["finetune.loss.options={}"],
}


def seg(*args, threads: int, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, "-m", "seg", "-q", *map(str, args)], env=env, check=check)


def first_reaching(rows: list[dict], level: float, key: str) -> float | None:
    for row in rows:
        if row.get("val_mean_dice") not in (None, "") and float(row["val_mean_dice"]) >= level:
            return float(row[key])
    return None


def summarise(run: Path) -> dict:
    """Time-to-accuracy figures of one run's metrics.json."""
    rows = json.loads((run / "metrics.json").read_text())
    scored = [r for r in rows if r.get("val_mean_dice") not in (None, "")]
    values = [float(r["val_mean_dice"]) for r in scored]
    waits = [float(r.get("data_wait") or 0) for r in rows]
    return {"cpu_to_0.5": first_reaching(rows, 0.5, "train_cpu_s"), "cpu_to_0.7": first_reaching(rows, 0.7, "train_cpu_s"),
            "wall_to_0.5": first_reaching(rows, 0.5, "train_wall_s"),
            "wall_to_0.7": first_reaching(rows, 0.7, "train_wall_s"),
            "best": max(values), "final": values[-1],
            "gain_last_quarter": history_gain(rows),
            "train_cpu_s": float(rows[-1]["train_cpu_s"]), "train_wall_s": float(rows[-1]["train_wall_s"]),
            "data_wait": sum(waits) / len(waits)}


def test_scores(metrics_json: Path) -> dict:
    """Mean DSC per organ over the test cases from ``seg evaluate``'s JSON."""
    data = json.loads(metrics_json.read_text())
    return {**{organ: v["dsc"] for organ, v in data["mean_per_organ"].items()}, "mean": data["mean"]["dsc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="phantom-scratch-vnet")
    parser.add_argument("--arms", default="recipe,paper",
                        help=f"comma-separated: recipe, paper, {', '.join(ABLATIONS)}")
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench-convergence"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="for every arm")
    parser.add_argument("--quick", action="store_true", help="a smoke-size check that the benchmark runs")
    args = parser.parse_args()
    from seg.core.config import load_experiment

    overrides = list(args.overrides)
    if args.quick:
        overrides += ["finetune.epochs=4", "finetune.steps_per_epoch=3", "finetune.val_every=2"]
        args.labeled, args.test = 4, 2
    epochs = load_experiment(args.experiment, overrides).finetune.epochs
    data = args.work / "data"
    if not (data / "dataset.json").exists():
        seg("data", "synth", data, "--labeled", args.labeled, "--unlabeled", 0, "--test", args.test, "--seed", 0,
            threads=args.threads)
    results = {}
    for arm in args.arms.split(","):
        sets = overrides + (paper_settings(epochs) if arm == "paper" else ABLATIONS.get(arm, []))
        run = args.work / arm
        set_args = [a for s in sets for a in ("--set", s)]
        if (run / "checkpoint_latest.pt").exists():
            seg("run", "finetune", "--resume", "--data", data, "--out", run, "--device", "cpu", threads=args.threads)
        else:
            seg("run", "finetune", "-e", args.experiment, *set_args, "--data", data, "--out", run, "--device", "cpu",
                threads=args.threads)
        pred = args.work / f"{arm}-pred"
        seg("predict", "-i", data / "imagesTs", "-o", pred, "--model", run, "--device", "cpu", threads=args.threads)
        seg("evaluate", "--pred", pred, "--gt", data / "labelsTs", "--out", args.work / f"{arm}-test.csv",
            threads=args.threads)
        results[arm] = {**summarise(run), "test": test_scores(args.work / f"{arm}-test.json")}
    fmt = lambda v: "-" if v is None else (f"{v:.0f}" if v >= 10 else f"{v:.3f}")  # noqa: E731
    print(f"\n{args.experiment}: {args.labeled} labeled phantoms ({args.labeled // 4} validate), {args.test} test, "
          f"{args.threads} threads")
    print(f"{'arm':17} {'CPU-s to 0.5':>12} {'to 0.7':>8} {'wall to 0.5':>11} {'to 0.7':>8} {'best':>6} {'final':>6} "
          f"{'last-quarter gain':>17} {'data wait':>9}")
    for arm, r in results.items():
        print(f"{arm:17} {fmt(r['cpu_to_0.5']):>12} {fmt(r['cpu_to_0.7']):>8} {fmt(r['wall_to_0.5']):>11} "
              f"{fmt(r['wall_to_0.7']):>8} {r['best']:6.3f} {r['final']:6.3f} {fmt(r['gain_last_quarter']):>17} "
              f"{r['data_wait']:9.3f}")
    print("\ntest DSC (seg evaluate on the held-out phantoms)")
    organs = list(LARGE) + list(SMALL)
    print(f"{'arm':17} " + " ".join(f"{o[:9]:>9}" for o in organs) + f" {'mean (13)':>10}")
    for arm, r in results.items():
        t = r["test"]
        print(f"{arm:17} " + " ".join(f"{t.get(o, float('nan')):9.3f}" for o in organs)
              + f" {t.get('mean', float('nan')):10.3f}")
    if {"recipe", "paper"} <= set(results):
        a, b = results["recipe"], results["paper"]
        if a["cpu_to_0.5"] and b["cpu_to_0.5"]:
            print(f"\nCPU-s to 0.5: recipe / paper = {a['cpu_to_0.5'] / b['cpu_to_0.5']:.2f}")
        else:
            print(f"\nCPU-s to 0.5: recipe {fmt(a['cpu_to_0.5'])}, paper {fmt(b['cpu_to_0.5'])} (never = -)")


if __name__ == "__main__":
    main()
