"""GPU readiness: the paper's training and inference settings on CUDA, measured in one command.

On a CUDA machine, each step in a fresh process:

1. ``seg run pretrain --ssl pcrl`` (experiment flare22-pcrl-vnet: batch 4 of 64 x 128 x 128) for ``--steps``
   steps with mixed precision (the training loop's AMP on CUDA), after ``seg data synth`` and ``seg data
   prepare`` of a few small phantoms;
2. ``seg run finetune --init`` that run (batch 4 of 80 x 160 x 160, the paper's patch), the same way;
3. ``seg predict`` of a 512 x 512 x 130 phantom (``seg data synth --size full`` anatomy; benchmarks/
   bench_predict.py's scan) at FP32 and at FP16, with the few-step model of 2 or ``--model RUN``; the scan is
   given twice and the second (warm) case is timed;
4. with two or more GPUs, step 2 as two processes under torchrun (DistributedDataParallel over NCCL: what
   ``seg run finetune --nproc 2`` launches).

It prints steps per second (the first step, warm-up, left out), peak GPU memory (PyTorch's allocator: peak
allocated and reserved; the CUDA context, a few hundred MB, is not in either), FP16 against FP32 and against
the paper's 1719 MB, and whether the FP16 labels agree with the FP32 ones on at least 99.9 % of voxels (a
verdict only for a trained ``--model``: the few-step model's near-ties flip under any rounding). Exit code 1
when a step failed or a trained model's labels disagree more. Without CUDA it prints one line and exits 0.

    python benchmarks/gpu_check.py               # one GPU: a few minutes (most of it making the phantoms)
    python benchmarks/gpu_check.py --model RUN   # FP16/FP32 agreement on a trained model
    python benchmarks/gpu_check.py --rehearse    # the same sequence on the CPU at smoke size (checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_PEAK_MB = 1719
AGREEMENT = 0.999


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peaks() -> dict:
    """Peak allocated and reserved GPU memory (MB) since the last reset (NaN without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_mb": math.nan, "peak_reserved_mb": math.nan}
    return {"peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def worker_train(seg_args: list[str]) -> dict:
    """Run ``seg ARGS`` (a training stage) in this process, timing every training step."""
    from seg.cli import main
    from seg.core import train

    marks, peaks = [], []
    original = train.TrainingLoop.run

    def run(self, compute_loss, *args, **kwargs):
        def timed(*a, **k):  # called once per step: the time between calls is one whole step
            _cuda_sync()
            marks.append(time.perf_counter())
            peaks.append(_peaks())
            return compute_loss(*a, **k)

        return original(self, timed, *args, **kwargs)

    train.TrainingLoop.run = run
    try:
        main(["-q", *seg_args])
    except SystemExit as exc:
        if exc.code:
            raise
    timed = marks[1:]  # the first step warms up (allocations, kernel selection)
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) >= 2 else math.nan
    return {"steps": len(marks), "steps_per_s": rate, **(peaks[-1] if peaks else _peaks())}


def worker_predict(inputs: str, output: str, model: str, device: str, precision: str) -> dict:
    """``seg predict`` of a folder in this process: per-case seconds and peak memory."""
    from seg.core.console import set_quiet
    from seg.core.predict import predict_paths

    set_quiet(True)
    summary = predict_paths(Path(inputs), Path(output), Path(model), device=device, precision=precision)
    if summary["failed"]:
        raise SystemExit(f"predict failed: {summary['failed']}")
    return {"seconds": summary["seconds"], **_peaks()}


def _worker(args) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before any CUDA use: a torchrun rank's GPU
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "train":
        result = worker_train(args.rest)
    else:
        result = worker_predict(*args.rest)
    if os.environ.get("RANK", "0") == "0":
        Path(args.result).write_text(json.dumps(result))


def _spawn(kind: str, rest: list, result: Path, nproc: int = 1) -> dict | None:
    """Run a worker in a fresh process (under torchrun when ``nproc`` > 1); its result, or None if it failed."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, __file__, "--worker", kind, "--result", str(result), "--", *map(str, rest)]
    started = time.perf_counter()
    done = subprocess.run(command)
    if done.returncode != 0:
        print(f"  FAILED ({done.returncode}): {' '.join(command)}", flush=True)
        return None
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started}


def _seg(*args) -> None:
    subprocess.run([sys.executable, "-m", "seg", "-q", *map(str, args)], check=True)


def _scan(path: Path, full: bool) -> tuple[int, ...]:
    """The 512 x 512 x 130 phantom of bench_predict.py (a small phantom when not ``full``); its size."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    if full:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_predict import make_scan

        make_scan(path, 130)
    else:
        from seg.core.synth import synthetic_case

        sitk.WriteImage(synthetic_case(0, 0, True, "small")[0], str(path), useCompression=True)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize()


def _agreement(a: Path, b: Path) -> tuple[float, float]:
    """Share of voxels with the same label in two label maps, over all voxels and over either's foreground."""
    import SimpleITK as sitk

    x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (a, b))
    foreground = (x > 0) | (y > 0)
    same = x == y
    return float(same.mean()), float(same[foreground].mean()) if foreground.any() else 1.0


def _mb(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f} MB"


def check(args) -> int:
    """Run the sequence (module docstring) and print the figures; the exit code."""
    import torch

    cuda = torch.cuda.is_available() and not args.rehearse
    device = "cuda" if cuda else "cpu"
    experiment = "smoke" if args.rehearse else "flare22-pcrl-vnet"
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda:
        name = torch.cuda.get_device_name(0)
        print(f"gpu_check: {gpus} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    else:
        print(f"gpu_check --rehearse: CPU, experiment {experiment} (figures mean nothing)", flush=True)
    from seg.core.config import load_experiment

    exp = load_experiment(experiment)
    root = Path(args.keep or tempfile.mkdtemp(prefix="gpu_check_"))
    root.mkdir(parents=True, exist_ok=True)
    data, pre, ft = root / "data", root / "pretrain", root / "finetune"
    failures = []
    steps = f"--set=pretrain.steps_per_epoch={args.steps}", f"--set=finetune.steps_per_epoch={args.steps}"
    try:
        print("making phantoms ...", flush=True)
        _seg("data", "synth", data, "--labeled", 3, "--unlabeled", 4, "--seed", 0)
        _seg("data", "prepare", data, "-e", experiment, "--workers", min(8, os.cpu_count() or 1))
        size = _scan(root / "scan" / "a_0000.nii.gz", full=not args.rehearse)
        shutil.copy(root / "scan" / "a_0000.nii.gz", root / "scan" / "b_0000.nii.gz")

        rows = []
        p, f = exp.pretrain, exp.finetune
        stages = [
            (f"pretrain pcrl {p.batch_size} x {'x'.join(map(str, p.patch_size))}", pre,
             ["run", "pretrain", "--ssl", "pcrl", "-e", experiment, "--data", data, "--out", pre, "--epochs", 1,
              "--device", device, *steps]),
            (f"finetune {f.batch_size} x {'x'.join(map(str, f.patch_size))}", ft,
             ["run", "finetune", "-e", experiment, "--data", data, "--out", ft, "--init", pre, "--epochs", 1,
              "--device", device, *steps]),
        ]
        for label, out, seg_args in stages:
            print(f"{label} ...", flush=True)
            result = _spawn("train", seg_args, root / f"{out.name}.json")
            rows.append((label, result))
            if result is None:
                failures.append(label)

        model = Path(args.model) if args.model else ft
        predictions = {}
        for precision in ("fp32", "fp16"):
            label = f"predict {'x'.join(map(str, size))} {precision}"
            print(f"{label} ...", flush=True)
            out = root / f"pred_{precision}"
            result = _spawn("predict", [root / "scan", out, model, device, precision], root / f"{out.name}.json")
            rows.append((label, result))
            if result is None:
                failures.append(label)
            else:
                predictions[precision] = out / "b.nii.gz"

        ddp = None
        if gpus >= 2 or args.rehearse:
            label = "finetune, 2 processes (DDP, " + ("NCCL)" if cuda else "gloo, rehearsal)")
            print(f"{label} ...", flush=True)
            out = root / "finetune_ddp"
            ddp = _spawn("train", ["run", "finetune", "-e", experiment, "--data", data, "--out", out, "--epochs", 1,
                                   "--device", device, *steps], root / "ddp.json", nproc=2)
            rows.append((label, ddp))
            if ddp is None:
                failures.append(label)

        print(f"\n{'step':44} {'steps/s':>8} {'s/case':>7} {'peak allocated':>15} {'peak reserved':>14}")
        for label, result in rows:
            if result is None:
                print(f"{label:44} FAILED")
                continue
            rate = f"{result['steps_per_s']:.2f}" if "steps_per_s" in result else ""
            per_case = f"{result['seconds'][-1]:.1f}" if "seconds" in result else ""
            print(f"{label:44} {rate:>8} {per_case:>7} {_mb(result['peak_allocated_mb']):>15} "
                  f"{_mb(result['peak_reserved_mb']):>14}")
        if gpus < 2 and not args.rehearse:
            print(f"{'finetune, 2 processes (DDP, NCCL)':44} skipped: {gpus} GPU here")

        results = dict(rows)
        fp32, fp16 = results.get(f"predict {'x'.join(map(str, size))} fp32"), \
            results.get(f"predict {'x'.join(map(str, size))} fp16")
        if fp32 and fp16:
            a, r = fp16["peak_allocated_mb"], fp32["peak_allocated_mb"]
            print(f"\npredict peak allocated: FP16 / FP32 = {a / r:.2f}; FP16 / the paper's {PAPER_PEAK_MB} MB "
                  f"= {a / PAPER_PEAK_MB:.2f}; FP16 reserved / the paper = "
                  f"{fp16['peak_reserved_mb'] / PAPER_PEAK_MB:.2f}")
            overall, foreground = _agreement(predictions["fp32"], predictions["fp16"])
            verdict = "yes" if overall >= AGREEMENT else "no"
            print(f"FP16 labels agree with FP32 on {100 * overall:.3f} % of voxels ({100 * foreground:.2f} % of "
                  f"the foreground): >= {100 * AGREEMENT:.1f} %: {verdict}")
            if not args.model:
                print(f"  (a model trained for {args.steps} steps, whose near-ties decide many voxels: not a verdict; "
                      "--model RUN checks a trained one)")
            elif overall < AGREEMENT:
                failures.append("FP16/FP32 agreement")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if failures:
        print(f"\nfailed: {', '.join(failures)}")
    return 1 if failures else 0


def main() -> None:
    """Parse the options; without CUDA (and not rehearsing) say so in one line and exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per stage (the first is warm-up)")
    parser.add_argument("--model", help="fine-tuning run (or model file) to predict with")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--rehearse", action="store_true", help="run the sequence on the CPU at smoke size")
    parser.add_argument("--worker", choices=["train", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    import torch

    if not torch.cuda.is_available() and not args.rehearse:
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); nothing measured")
        return
    raise SystemExit(check(args))


if __name__ == "__main__":
    main()
