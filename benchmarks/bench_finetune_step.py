"""One fine-tuning step of seg's V-Net + gdice_ce beside the same network with MONAI's loss and beside MONAI's VNet.

A step is forward, loss, backward and an Adam step (lr 1e-4) on one random patch (batch 1, 14 classes)
of the paper's fine-tuning size, 80 x 160 x 160, in fp32 on the CPU, in the same plain PyTorch loop for
every row (what ``seg run finetune`` does per step on the CPU, where it uses no mixed precision):

- ``seg vnet + gdice_ce``: ``vnet`` with the paper's options (base 16, depth 5) and ``gdice_ce``.
- ``seg vnet + DiceCELoss``: the same network with MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``:
  the same arithmetic as the first row in the network (690.7 G multiply-accumulates forward), so this ratio
  is seg's loss and nothing else.
- ``monai VNet + DiceCELoss``: ``monai.networks.nets.VNet`` with its defaults (the same widths, 16 to 256;
  ELU, dropout; 813.1 G forward, 114.7 G of it in its 5x5x5 output convolution where seg's V-Net has
  Milletari's 1x1x1 head) and the same loss: what a MONAI user would train instead.

Why seg's rows cost less than MONAI's VNet: the network's layout (above; 43.54 M parameters against 45.65 M);
PReLU in place while training on the CPU (``InPlacePReLU``, valid while every slope is > 0: one
activation-sized tensor less per convolution, about 0.5 GB at this size) and in-place residual sums; the 1x1x1
head and 2x2x2 up-convolutions as matrix products. Against ``DiceCELoss``, ``gdice_ce`` builds no one-hot
tensor (a gather and a scatter-add per class) and shares one log-softmax between its two terms. Tried and left
out: ``channels_last_3d`` (oneDNN was as fast at 16-32 channels and 2.6x slower in the forward pass at 64).

Each row runs in its own subprocess so its peak resident memory (``resource.getrusage``) is its own;
rows alternate ``--rounds`` times, so all see the same share of a busy machine. s/step = median of all
timed steps (``--steps`` per round, each round after one untimed warm-up step), best s = the fastest;
peak RSS = the largest of the rounds; RSS built = the peak before the first step (interpreter, libraries,
network); ratios = seg vnet + gdice_ce / the row named.

    python benchmarks/bench_finetune_step.py            # paper size: about 15 minutes on 2 cores
    python benchmarks/bench_finetune_step.py --quick    # 16 x 32 x 32, one step per row: checks the script
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

ROWS = {"seg": "seg vnet + gdice_ce", "same": "seg vnet + DiceCELoss", "monai": "monai VNet + DiceCELoss"}
CLASSES = 14


def build(row: str):
    """The network and the loss (logits, labels) -> scalar of one row."""
    if row == "seg":
        from seg.plugins.losses import GeneralizedDiceCE
        from seg.plugins.vnet import VNet

        return VNet(1, CLASSES, base_channels=16, depth=5), GeneralizedDiceCE(CLASSES)
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    if row == "same":
        from seg.plugins.vnet import VNet

        network = VNet(1, CLASSES, base_channels=16, depth=5)
    else:
        from monai.networks.nets import VNet

        network = VNet(spatial_dims=3, in_channels=1, out_channels=CLASSES)
    return network, lambda x, y: dice_ce(x, y[:, None])


def worker(row: str, size: list[int], steps: int, threads: int) -> dict:
    """Time ``steps`` fine-tuning steps after a warm-up step; peak RSS of this process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network, loss_fn = build(row)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    image = torch.randn(1, 1, *size)
    labels = torch.randint(0, CLASSES, (1, *size))
    built_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(network(image), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            seconds.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "built_mb": built_mb, "peak_rss_mb": peak_mb,
            "params_m": sum(p.numel() for p in network.parameters()) / 1e6, "loss": float(loss.detach())}


def run_row(row: str, args) -> dict | None:
    """One worker subprocess; None (with a message) when it fails, e.g. MONAI is not installed."""
    command = [sys.executable, __file__, "--worker", row, "--size", *map(str, args.size),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{ROWS[row]}: skipped ({(done.stderr.strip().splitlines() or ['failed'])[-1]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the command line, run the rows alternately, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[80, 160, 160], metavar=("D", "H", "W"))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocesses per row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="16 x 32 x 32, one step per row")
    parser.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.rounds = [16, 32, 32], 1, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.steps, args.threads)))
        return
    results = {row: [] for row in ROWS}
    for _ in range(args.rounds):
        for row in ROWS:
            result = run_row(row, args)
            if result is not None:
                results[row].append(result)
    summary = {}
    for row, rs in results.items():
        if rs:
            seconds = [s for r in rs for s in r["seconds"]]
            summary[row] = (statistics.median(seconds), max(r["peak_rss_mb"] for r in rs), rs[0]["params_m"],
                            max(r["built_mb"] for r in rs), min(seconds))
    print(f"\nfine-tuning step, batch 1, {'x'.join(map(str, args.size))}, {CLASSES} classes, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'row':<26}{'params (M)':>11}{'s/step':>9}{'best s':>9}{'RSS built (MB)':>16}{'peak RSS (MB)':>15}")
    for row, (seconds, rss, params, built, best) in summary.items():
        print(f"{ROWS[row]:<26}{params:>11.2f}{seconds:>9.2f}{best:>9.2f}{built:>16.0f}{rss:>15.0f}")
    if "seg" in summary:
        for row in ("same", "monai"):
            if row in summary:
                print(f"seg vnet + gdice_ce / {ROWS[row]}: time {summary['seg'][0] / summary[row][0]:.2f}, "
                      f"peak RSS {summary['seg'][1] / summary[row][1]:.2f}")


if __name__ == "__main__":
    main()
