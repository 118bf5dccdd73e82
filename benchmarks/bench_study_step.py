"""What one fine-tuning step of the label-budget study costs at 48, 64 and 80 pixels a slice side, side by side.

The study (docs/study/) is sized by this figure: 27 fine-tuning runs of 3000 steps on 2 cores. A step is what
``seg run finetune`` does per step on the CPU for ``study-scratch-vnet``: augmentation (``augment_batch``
with the experiment's settings), forward, the experiment's loss, backward and its optimizer's step, on a batch
of 2 random patches of 16 slices, in fp32. The network, loss, optimizer and augmentation are built from the
registry, so the rows follow the recipe when it changes; only the in-plane patch size differs between rows:

- ``48 x 48``: the study's slices (``study-*-vnet``).
- ``64 x 64``: session 7's study slices.
- ``80 x 80``: the phantom recipe's slices (``phantom-*-vnet``).

Each row runs in its own subprocess, one thread (what each of ``seg study --jobs 2``'s workers gets on 2 cores);
rows alternate ``--rounds`` times so that each sees the same share of a busy machine. CPU-s/step is the median
of the timed steps' process CPU time (``time.process_time``), wall s/step the median wall time; ratios are each
row over the 48 x 48 row.

    python benchmarks/bench_study_step.py            # 3 rounds x 10 steps a row: about 1 minute
    python benchmarks/bench_study_step.py --quick    # 1 round x 1 step a row: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

SIDES = (48, 64, 80)
SLICES = 16
CLASSES = 14
EXPERIMENT = "study-scratch-vnet"


def worker(side: int, steps: int) -> dict:
    """Time ``steps`` study fine-tuning steps on ``SLICES x side x side`` patches after one warm-up step."""
    from seg.core import plugins
    from seg.core.augment import augment_batch
    from seg.core.config import load_experiment
    from seg.core.model import build_backbone
    from seg.core.train import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    exp = load_experiment(EXPERIMENT)
    cfg = exp.finetune
    network = build_backbone(exp.backbone, 1, CLASSES)
    loss_fn = plugins.get("losses", cfg.loss.name)(CLASSES, **cfg.loss.options)
    optimizer = build_optimizer(network.parameters(), cfg.optimizer)
    images = torch.randn(cfg.batch_size, 1, SLICES, side, side)
    labels = torch.randint(0, CLASSES, (cfg.batch_size, SLICES, side, side))
    cpu, wall = [], []
    for step in range(steps + 1):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        x, y = augment_batch(images, labels, cfg.augment, seed=step)
        loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start_wall)
    return {"cpu": cpu, "wall": wall, "loss": float(loss.detach())}


def run_row(side: int, steps: int) -> dict:
    """One worker subprocess for one row."""
    command = [sys.executable, __file__, "--worker", str(side), "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the command line, run the rows alternately, print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocesses per row")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 step a row")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 1, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    results = {side: {"cpu": [], "wall": []} for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            row = run_row(side, args.steps)
            results[side]["cpu"] += row["cpu"]
            results[side]["wall"] += row["wall"]
    cpu = {side: statistics.median(r["cpu"]) for side, r in results.items()}
    wall = {side: statistics.median(r["wall"]) for side, r in results.items()}
    print(f"\n{EXPERIMENT} fine-tuning step: batch 2 x {SLICES} slices, {CLASSES} classes, fp32, 1 thread, "
          f"torch {torch.__version__}, {args.rounds} x {args.steps} steps a row")
    print(f"{'slices':<10}{'CPU-s/step':>12}{'wall s/step':>13}{'CPU / 48 x 48':>15}")
    for side in SIDES:
        print(f"{f'{side} x {side}':<10}{cpu[side]:>12.3f}{wall[side]:>13.3f}{cpu[side] / cpu[SIDES[0]]:>15.2f}")


if __name__ == "__main__":
    main()
