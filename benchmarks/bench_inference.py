"""Network-only inference timing: the full z sliding window versus ``roi="coarse"`` on a long scan.

A synthetic scan much longer than the abdomen (by default 320 slices, the "abdomen" a bright block of 100
slices in the middle) goes through each inferer with an untrained V-Net (tiny and mid-size; a small stand-in
conv net where seg's ``vnet`` is missing). So that the coarse pass has an abdomen to find, each network's
logits get a 1x1x1 "oracle" term that says organ where the input is bright; the V-Net's own output is scaled
by 1e-3, so it still does all of its work but does not decide the labels. The oracle finds the abdomen
perfectly by construction: this table measures what the coarse pass and the narrower fine pass cost, not
whether a real network finds the abdomen. ``--model RUN`` measures that with a trained fine-tuning run (such
as ``seg run finetune -e phantom-scratch-vnet``): a phantom of ``--length`` mm of body (benchmarks/
bench_predict.py's scans), its preprocessing, both inferers with the run's network; forwarded slices, times,
the z-range labelled, each one's mean Dice against the phantom's labels and the share of voxels that agree,
then the ground truth's z-range and what the full window labels outside it.

    python benchmarks/bench_inference.py                 # CPU-sized defaults (a few minutes on 2 cores)
    python benchmarks/bench_inference.py --paper --device cuda  # the paper: 80 x 160 x 160 windows, base 16
    python benchmarks/bench_inference.py --device cuda   # adds fp16 rows and peak GPU memory
    python benchmarks/bench_inference.py --model RUN     # a trained network on a 500 mm phantom (about 2 minutes)
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_inference.py --precision fp32,bf16 --depth 32 --abdomen 16 \
        --size 32 --window 16 --repeat 1 --threads 1  # bf16 on a CPU without native bfloat16 (emulated: AVX2)

Columns: forwarded = slices through the network at full resolution (+ coarse ones at 1/downsample^2
of the in-plane cost, suffix c); seconds (wall) and cpu s (process CPU time) = fastest of --repeat runs;
ratio = this row's / the full sliding window's (same precision) cpu s on the CPU, seconds on CUDA. On a
CPU shared with other work wall times swing: --threads 1 keeps the cpu s column steady. With several
``--precision`` values each network ends with each precision's time over fp32's, per inferer (on the CPU
autocast at bf16 or fp16 runs on native bfloat16 instructions where the CPU has them, AVX512-BF16 or AMX,
and is emulated elsewhere; ``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN use AVX2 only, such a CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from seg.core import plugins
from seg.core.inference import resolve_device, resolve_precision
from seg.plugins.inferers import WholeVolume, ZSlidingWindow


class StandIn(nn.Module):
    """A small conv net (used only where seg's ``vnet`` backbone is not installed)."""

    def __init__(self, classes: int, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv3d(width, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, classes, 1))

    def forward(self, x):
        return self.body(x)


class Recorded(nn.Module):
    """``body``, recording the shape of every input (forwarded slices)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.body(x)


class WithOracle(Recorded):
    """``body(x) * 1e-3`` plus a 1x1x1 term: class 1 where x > 0.5, else background. Counts forwarded slices."""

    def __init__(self, body: nn.Module, classes: int):
        super().__init__(body)
        self.oracle = nn.Conv3d(1, classes, 1)
        with torch.no_grad():
            self.oracle.weight.zero_()
            self.oracle.weight[1] = 20.0
            self.oracle.bias.fill_(-5.0)
            self.oracle.bias[0], self.oracle.bias[1] = 0.0, -10.0

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.body(x) * 1e-3 + self.oracle(x)


def networks(classes: int, paper: bool) -> list[tuple[str, nn.Module]]:
    """(name, network) pairs: a tiny and a mid-size V-Net, or stand-ins."""
    if "vnet" in plugins.names("backbones"):
        vnet = plugins.get("backbones", "vnet")
        sizes = [("vnet base 4, depth 3", dict(base_channels=4, depth=3)),
                 ("vnet base 8, depth 4", dict(base_channels=8, depth=4))]
        if paper:
            sizes = [sizes[0], ("vnet base 16, depth 5 (paper)", dict(base_channels=16, depth=5))]
        return [(name, vnet(1, classes, **options)) for name, options in sizes]
    return [("stand-in conv net, width 4", StandIn(classes, 4)), ("stand-in conv net, width 16", StandIn(classes, 16))]


def long_scan(depth: int, size: int, abdomen: int) -> torch.Tensor:
    """Noise in [0, 0.4] with a bright in-plane disc over ``abdomen`` slices in the middle of ``depth``."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, depth, size, size, generator=generator) * 0.4
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    z0 = (depth - abdomen) // 2
    image[0, 0, z0:z0 + abdomen, disc] = 1.0
    return image


def labelled_slices(labels: torch.Tensor) -> torch.Tensor:
    """Indices of the slices (first axis) of a label map that hold any foreground."""
    return torch.nonzero(labels.flatten(1).amax(1)).flatten()


def timed(inferer, network: Recorded, image, device, precision, size: int, repeat: int) -> dict:
    """Best of ``repeat`` runs: seconds, slices forwarded (full resolution, coarse), the labelled z-range,
    peak GPU MiB, the labels."""
    seconds = cpu = float("inf")
    for _ in range(repeat):
        network.shapes.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, start_cpu = time.perf_counter(), time.process_time()
        scores = inferer(network, image, device=device, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    fine = sum(s[0] * s[2] for s in network.shapes if s[-1] >= size)
    coarse = sum(s[0] * s[2] for s in network.shapes if s[-1] < size)
    labels = scores.argmax(0)
    organ = labelled_slices(labels)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    z_range = f"{int(organ[0])}..{int(organ[-1])}" if organ.numel() else "-"
    return dict(seconds=seconds, cpu=cpu, fine=fine, coarse=coarse, z=z_range, peak=peak, labels=labels)


def trained(run: Path, length: int, small: bool, repeat: int) -> None:
    """The full sliding window and ``roi="coarse"`` with a trained run's network on a phantom of ``length`` mm of
    body (``small``: a small phantom, mirrored beyond its extent, to check this script)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import SimpleITK as sitk
    from bench_predict import body_scans, mean_dice

    from seg.core.io import read_image
    from seg.core.predict import load_predictor
    from seg.core.preprocessing import Sample, run_pipeline, to_array

    predictor = load_predictor(run, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        scan, truth = body_scans(Path(tmp), [length], 1.6, "small" if small else "full")[length]
        sample, _ = run_pipeline(predictor.pipeline, Sample(read_image(scan), read_image(truth)))
    image = torch.from_numpy(to_array(sample.image))[None, None]
    truth = torch.from_numpy(sitk.GetArrayFromImage(sample.label))
    inferer = predictor.experiment.predict.inferer
    options = {**inferer.options, "roi": None}
    network = Recorded(predictor.network).eval()
    print(f"{run}: {length} mm of body, preprocessed {tuple(image.shape[2:])}, {inferer.name} {inferer.options}")
    print(f"{'inferer':28} {'forwarded':>14} {'seconds':>8} {'cpu s':>7} {'ratio':>6} {'organ z':>9} {'Dice':>6} "
          f"{'agree %':>8}")
    full = None
    for label, roi in (("z_sliding_window", None), ("z_sliding_window roi=coarse", "coarse")):
        row = timed(plugins.get("inferers", inferer.name)(**{**options, "roi": roi}), network, image,
                    torch.device("cpu"), "fp32", image.shape[-1], repeat)
        full = full or row
        forwarded = f"{row['fine']}" + (f" + {row['coarse']}c" if row["coarse"] else "")
        agree = 100 * float((row["labels"] == full["labels"]).double().mean())
        print(f"{label:28} {forwarded:>14} {row['seconds']:8.2f} {row['cpu']:7.2f} {row['cpu'] / full['cpu']:6.2f} "
              f"{row['z']:>9} {mean_dice(row['labels'].numpy(), truth.numpy()):6.3f} {agree:8.3f}")
    organ = labelled_slices(truth)
    outside = full["labels"].clone()
    outside[int(organ[0]):int(organ[-1]) + 1] = 0
    per_slice = (outside > 0).flatten(1).sum(1)
    print(f"ground truth in slices {int(organ[0])}..{int(organ[-1])} of {truth.shape[0]}; the full window labels "
          f"{int(per_slice.sum())} voxels outside them, in {int((per_slice > 0).sum())} slices "
          f"({int(per_slice[per_slice > 0].min()) if per_slice.any() else 0}-{int(per_slice.max())} a slice)")


def main() -> None:
    """Run the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=320, help="slices in the long scan")
    parser.add_argument("--abdomen", type=int, default=100, help="slices of 'abdomen' in its middle")
    parser.add_argument("--size", type=int, default=64, help="in-plane size (paper: 160)")
    parser.add_argument("--window", type=int, default=32, help="window slices (paper: 80)")
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--paper", action="store_true", help="paper sizes: 480 x 160 x 160, window 80, base 16")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--whole", action="store_true", help="also time whole_volume (memory-hungry)")
    parser.add_argument("--precision", help="comma-separated fp32, fp16, bf16 (default: fp32; on CUDA also fp16)")
    parser.add_argument("--model", type=Path, help="a trained fine-tuning run: its network on a phantom instead")
    parser.add_argument("--length", type=int, default=500, help="with --model: mm of body along z")
    parser.add_argument("--small", action="store_true", help="with --model: a small phantom (checks the script)")
    args = parser.parse_args()
    if args.paper:
        args.depth, args.size, args.window = max(args.depth, 480), 160, 80
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        trained(args.model, args.length, args.small, args.repeat)
        return
    device = resolve_device(args.device)
    precisions = ["fp32"] + ([resolve_precision("auto", device)] if device.type == "cuda" else [])
    if args.precision:
        precisions = args.precision.split(",")
        if not set(precisions) <= {"fp32", "fp16", "bf16"}:
            raise SystemExit(f"--precision {args.precision}: expected fp32, fp16 or bf16, comma-separated")
    image = long_scan(args.depth, args.size, args.abdomen)
    print(f"scan {args.depth} x {args.size} x {args.size}, abdomen {args.abdomen} slices at "
          f"{(args.depth - args.abdomen) // 2}.., window {args.window}, overlap 0.5, {args.classes} classes, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    strategies = [("z_sliding_window", ZSlidingWindow(window=args.window)),
                  ("z_sliding_window roi=coarse", ZSlidingWindow(window=args.window, roi="coarse"))]
    if args.whole:
        strategies.append(("whole_volume", WholeVolume()))
    header = f"{'network':32} {'strategy':28} {'prec':5} {'forwarded':>14} {'seconds':>8} {'cpu s':>7} {'ratio':>6} " \
             f"{'organ z':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for name, body in networks(args.classes, args.paper):
        network = WithOracle(body, args.classes).to(device).eval()
        with torch.inference_mode():
            network(torch.zeros(1, 1, args.window, args.size, args.size, device=device))  # warm-up
        measures = {}
        for precision in precisions:
            baseline = None
            for label, inferer in strategies:
                row = timed(inferer, network, image, device, precision, args.size, args.repeat)
                measure = row["cpu"] if device.type == "cpu" else row["seconds"]
                measures[precision, label] = measure
                baseline = baseline or measure
                forwarded = f"{row['fine']}" + (f" + {row['coarse']}c" if row["coarse"] else "")
                print(f"{name:32} {label:28} {precision:5} {forwarded:>14} {row['seconds']:8.2f} {row['cpu']:7.2f} "
                      f"{measure / baseline:6.2f} {row['z']:>9} {row['peak']:9.0f}", flush=True)
        if len(precisions) > 1:
            for precision in precisions[1:]:
                print(f"{name}: {precision} / {precisions[0]} time: " + ", ".join(
                    f"{label} {measures[precision, label] / measures[precisions[0], label]:.2f}"
                    for label, _ in strategies), flush=True)


if __name__ == "__main__":
    main()
