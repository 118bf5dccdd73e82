"""Is this machine's bfloat16 ``conv3d`` weight gradient right? The check behind ``seg.core.train``'s rule that
the CPU trains at fp32 whatever ``finetune.precision`` asks.

For the 3x3x3 convolutions of the study V-Net's levels (``study-pcrl-vnet``: batch 2 of 16 x 64 x 64 patches,
8 channels doubling at each of 4 levels), the weight gradient of the same inputs computed ``--repeat`` times at
bf16 and at fp32, each against float64 on the same (bf16-rounded) numbers: how many distinct results the
repeats gave, how many held NaN or infinity, and the largest error relative to the gradient's largest entry.
A correct kernel gives one result and an error near bf16's rounding (~1e-2) or fp32's (~1e-6).

    python benchmarks/bf16_grad_check.py [--device cpu|cuda] [--repeat 20]

Measured (torch 2.13.0 CPU, oneDNN 3.12, AMD EPYC with AVX512-BF16, 2026-12-02, three runs): at 2 x 8 x 8
with 64 channels bf16 is wrong, errors 1e18 to 7e20 times the gradient's largest entry, and not even
repeatable (6 distinct results in one run of 40 calls); the three larger levels at bf16 err by 0.003 and
every fp32 case by at most 3e-6, one result each.
"""

from __future__ import annotations

import argparse

import torch

LEVELS = [(8, (16, 64, 64)), (16, (8, 32, 32)), (32, (4, 16, 16)), (64, (2, 8, 8))]


def weight_gradients(x, w, g, dtype, repeat: int) -> list[torch.Tensor]:
    """The weight gradient of ``conv3d(x, w)`` for output gradient ``g``, ``repeat`` times at ``dtype``."""
    out = []
    for _ in range(repeat):
        weight = w.to(dtype, copy=True).requires_grad_(True)
        torch.nn.functional.conv3d(x.to(dtype), weight, padding=1).backward(g.to(dtype))
        out.append(weight.grad.double())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {args.repeat} calls each")
    print(f"{'channels':>8} {'size':>12} {'dtype':>9} {'distinct':>8} {'non-finite':>10} {'max rel. error':>15}")
    for channels, size in LEVELS:
        shape = (2, channels, *size)
        # bf16-representable inputs, so both precisions and the float64 reference see the same numbers
        x = torch.randn(shape).bfloat16().float().to(args.device)
        w = (torch.randn(channels, channels, 3, 3, 3) * 0.05).bfloat16().float().to(args.device)
        g = (torch.randn(shape) * 1e-3).bfloat16().float().to(args.device)
        w64 = w.double().requires_grad_(True)
        torch.nn.functional.conv3d(x.double(), w64, padding=1).backward(g.double())
        scale = w64.grad.abs().max()
        for dtype in (torch.bfloat16, torch.float32):
            grads = weight_gradients(x, w, g, dtype, args.repeat)
            distinct = len({t.cpu().numpy().tobytes() for t in grads})
            bad = sum(not torch.isfinite(t).all() for t in grads)
            finite = [t for t in grads if torch.isfinite(t).all()]
            error = max(((t - w64.grad).abs().max() / scale).item() for t in finite) if finite else float("nan")
            print(f"{channels:>8} {'x'.join(map(str, size)):>12} {str(dtype)[6:]:>9} {distinct:>8} {bad:>10} "
                  f"{error:>15.3g}")


if __name__ == "__main__":
    main()
