"""The inference speed-ups of ``seg predict``, each beside what it replaces, at the paper's full-resolution sizes.

Rows (fp32, CPU, autograd off; seconds = best of ``--repeat``; ratio = ours / torch's):

- ``class_argmax`` vs ``Tensor.argmax(0)`` on 14 x 96 x 160 x 160 class scores;
- ``PointwiseConv3d`` (the 1x1x1 head as a matrix product) vs ``F.conv3d``, 32 -> 14 channels at 96 x 160 x 160;
- ``UpConv3d`` (2x2x2 stride-2 up-convolution as a matrix product) vs ``F.conv_transpose3d``, 64 -> 16 channels
  from 48 x 80 x 80;
- ``InPlacePReLU`` vs ``F.prelu`` on 32 x 96 x 160 x 160;
- ``build_with_weights`` vs building the paper-size V-Net (random initialisation) and loading the same weights;
- ``--forward``: one 96 x 160 x 160 forward pass of the paper-size V-Net with and without ``for_inference()``
  (batch norms folded; adds about 25 s).

    python benchmarks/bench_layers.py [--forward] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from seg.core import plugins
from seg.core.config import PluginChoice
from seg.core.inference import class_argmax
from seg.core.model import build_backbone, build_with_weights
from seg.plugins.vnet import InPlacePReLU, PointwiseConv3d, UpConv3d


def best(fn, repeat: int) -> float:
    """Fastest of ``repeat`` timed calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Time every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--forward", action="store_true", help="also time a whole forward pass (about 25 s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        scores = torch.rand(14, 96, 160, 160)
        rows.append(("class_argmax vs argmax(0)", best(lambda: class_argmax(scores), args.repeat),
                     best(lambda: scores.argmax(0), args.repeat)))
        x, head = torch.randn(1, 32, 96, 160, 160), PointwiseConv3d(32, 14)
        rows.append(("PointwiseConv3d vs conv3d 1x1x1", best(lambda: head(x), args.repeat),
                     best(lambda: F.conv3d(x, head.weight, head.bias), args.repeat)))
        low, up = torch.randn(1, 64, 48, 80, 80), UpConv3d(64, 16, bias=False)
        rows.append(("UpConv3d vs conv_transpose3d", best(lambda: up(low), args.repeat),
                     best(lambda: F.conv_transpose3d(low, up.weight, stride=2), args.repeat)))
        act = InPlacePReLU(32)
        rows.append(("InPlacePReLU vs prelu", best(lambda: act(x), args.repeat),
                     best(lambda: F.prelu(x, act.weight), args.repeat)))
    choice = PluginChoice("vnet", {})
    plugins.get("backbones", "vnet")
    weights = build_backbone(choice, 1, 14).state_dict()

    def plain():
        build_backbone(choice, 1, 14).load_state_dict(weights)

    rows.append(("build_with_weights vs build + load", best(lambda: build_with_weights(choice, 1, 14, weights, "-"),
                                                             args.repeat), best(plain, args.repeat)))
    if args.forward:
        image = torch.randn(1, 1, 96, 160, 160)
        network = build_with_weights(choice, 1, 14, weights, "-").eval()
        with torch.inference_mode():
            unfolded = best(lambda: network(image), 1)
            folded = network.for_inference()
            rows.append(("V-Net forward: for_inference vs eval", best(lambda: folded(image), 1), unfolded))
    print(f"{'row':40} {'ours s':>8} {'torch s':>8} {'ratio':>6}   ({torch.get_num_threads()} threads)")
    for name, ours, theirs in rows:
        print(f"{name:40} {ours:8.3f} {theirs:8.3f} {ours / theirs:6.2f}")


if __name__ == "__main__":
    main()
