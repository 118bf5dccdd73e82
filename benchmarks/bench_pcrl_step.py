"""One PCRL pretraining step: seg's ``pcrl`` task versus the official PCRL 3D code, side by side.

Rows (each a full step: forward, backward, optimizer step, momentum and queue update):

- ``seg pcrl + vnet``: seg's task with seg's V-Net at the paper's widths (base 16, depth 5), Adam as in the
  paper, on patches of the paper's pretraining size (64 x 128 x 128) cropped to the official crop size.
- ``seg pcrl + official U-Net`` (needs ``--official``): seg's task with the official ``PCRLModel3d`` layers
  behind seg's EncoderDecoder protocol: the same network as the next row, so the same convolutions.
- ``official train_rep_C2L`` (needs ``--official``): the official ``pcrl_3d.train_rep_C2L`` on one batch.

The work per step of the last two rows is the same: 2 ordinary-encoder passes with backward, 2 momentum
passes, 4 decoder passes with backward, 3 contrast terms against a 16384-key queue, an optimizer step and
a momentum update. seg's rows also augment inside the step (crops from a bigger patch, blur, in/outpainting,
flips/turns; timed alone in the ``augmentation`` row); the official code does that in DataLoader workers,
outside its step, so seg's rows do slightly more. The official step runs without its global
``torch.autograd.set_detect_anomaly(True)`` (a debugging switch that would slow it several-fold).

    git clone https://github.com/Luchixiang/PCRL /tmp/PCRL        # any checkout: nothing in it is changed
    python benchmarks/bench_pcrl_step.py --official /tmp/PCRL     # paper settings: minutes per step on CPU
    python benchmarks/bench_pcrl_step.py --official /tmp/PCRL --batch 2 --crop 16 32 32 --patch 32 64 64

The official code is imported as it is: apex, PIL and segmentation_models_pytorch (unused by its 3D step) are
stubbed, and on CPU ``.cuda()`` is made a no-op. Both sides run in fp32. seconds = median of ``--repeat``
interleaved steps after ``--warmup`` untimed steps each; ratio = seconds / the official row's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from seg.plugins.pcrl import PCRL
from seg.plugins.ssl_transforms import Augmentation


@contextlib.contextmanager
def _no_loss_scaling(loss, optimizer):
    """apex.amp.scale_loss without mixed precision."""
    yield loss


def load_official(path: Path, device: torch.device) -> types.SimpleNamespace | None:
    """The official modules from a checkout of Luchixiang/PCRL, or None (with a message) if absent."""
    code = path / "pytorch" if (path / "pytorch").is_dir() else path
    if not (code / "pcrl_3d.py").exists():
        print(f"official column skipped: no pcrl_3d.py under {path}")
        return None
    apex = types.ModuleType("apex")
    apex.amp = types.SimpleNamespace(scale_loss=_no_loss_scaling)
    apex.optimizers = types.ModuleType("apex.optimizers")
    pil = types.ModuleType("PIL")
    pil.ImageFilter = types.ModuleType("PIL.ImageFilter")
    models = types.ModuleType("models")  # skips models/__init__.py, which imports the 2D networks
    models.__path__ = [str(code / "models")]
    models.InsResNet18 = None
    sys.modules.update({"apex": apex, "PIL": pil, "PIL.ImageFilter": pil.ImageFilter, "models": models,
                        "segmentation_models_pytorch": types.ModuleType("segmentation_models_pytorch")})
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        nn.Module.cuda = lambda self, *args, **kwargs: self
        torch.cuda.synchronize = lambda *args, **kwargs: None
    sys.path.insert(0, str(code))
    import pcrl_3d
    from losses import NCECriterion
    from memory_c2l import MemoryC2L
    from models.pcrl_model_3d import PCRLModel3d

    return types.SimpleNamespace(pcrl_3d=pcrl_3d, PCRLModel3d=PCRLModel3d, MemoryC2L=MemoryC2L,
                                 NCECriterion=NCECriterion)


class OfficialUNet(nn.Module):
    """The official PCRLModel3d's layers as a seg EncoderDecoder (for a same-network comparison)."""

    def __init__(self, official):
        super().__init__()
        net = official.PCRLModel3d(n_class=1, in_channels=1, student=False, norm="bn")
        self.down = nn.ModuleList([net.down_tr64, net.down_tr128, net.down_tr256, net.down_tr512])
        self.up = nn.ModuleList([net.up_tr256, net.up_tr128, net.up_tr64])
        self.out = net.out_tr

    def encoder_modules(self):
        """The encoder's child modules."""
        return ["down"]

    def encode(self, x):
        """Feature maps of the four levels, finest first (official forward)."""
        features = [self.down[0](x)]
        for stage in self.down[1:]:
            features.append(stage(F.max_pool3d(features[-1], 2)))
        return features

    def decode(self, features):
        """The sigmoid reconstruction (official decoder)."""
        x = features[-1]
        for stage, skip in zip(self.up, reversed(features[:-1])):
            x = stage(x, skip)
        return self.out(x)

    def forward(self, x):
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))


def vnet_backbone() -> nn.Module:
    """seg's V-Net at the paper's widths, with one output (the pretraining backbone)."""
    from seg.core import plugins

    return plugins.get("backbones", "vnet")(1, 1, base_channels=16)


def seg_step(backbone: nn.Module, args, device) -> tuple:
    """A step closure for seg's PCRL task with ``backbone``, and its parameter count."""
    task = PCRL(backbone, crop_size=tuple(args.crop), queue_size=args.queue).to(device)
    optimizer = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    patches = torch.randn(args.batch, 1, *args.patch, device=device)

    def step():
        loss, _ = task(patches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_optimizer_step()

    return step, sum(p.numel() for p in task.backbone.parameters())


def augmentation_step(args, device):
    """A closure running only seg's augmentation of one batch (views, corruptions, flips/turns)."""
    aug = Augmentation(crop_size=tuple(args.crop))
    patches = torch.randn(args.batch, 1, *args.patch, device=device)

    def step():
        clean1, clean2 = aug.views(patches)
        aug.corrupt(clean1, clean2)
        aug.flip_rotate(clean1)
        aug.flip_rotate(clean2)

    return step


def official_step(official, args, device) -> tuple:
    """A step closure for the official train_rep_C2L on one batch, and its parameter count."""
    pcrl_3d = official.pcrl_3d
    model = official.PCRLModel3d(in_channels=1, n_class=1, student=True, norm="bn").to(device)
    model_ema = official.PCRLModel3d(in_channels=1, n_class=1, student=False, norm="bn").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    n_data = 1000
    contrast = official.MemoryC2L(128, n_data, args.queue, 0.2, False).to(device)
    criterion, criterion2 = official.NCECriterion(n_data), nn.MSELoss()
    pcrl_3d.moment_update(model, model_ema, 0)
    shape = (args.batch, 1, args.crop[2], args.crop[1], args.crop[0])  # its (x, y, z) order
    volumes = [torch.rand(shape, device=device) for _ in range(6)]
    codes = [torch.eye(7, device=device)[torch.randint(0, 7, (args.batch,))] for _ in range(2)]
    batch = (*volumes, *codes)

    def step():
        with contextlib.redirect_stdout(None):
            pcrl_3d.train_rep_C2L(0, [batch], model, model_ema, contrast, criterion, optimizer, criterion2)

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    """Time the rows and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, help="a checkout of Luchixiang/PCRL (skip its rows if absent)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, nargs=3, default=[32, 64, 64], help="D H W (official 64x64x32 xyz)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128], help="D H W of seg's input patches")
    parser.add_argument("--queue", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    official = load_official(args.official, device) if args.official else None
    if args.official is None:
        print("official rows skipped: pass --official PATH (a checkout of Luchixiang/PCRL)")
    rows = {"seg pcrl + vnet (base 16)": seg_step(vnet_backbone(), args, device)}
    if official is not None:
        rows["seg pcrl + official U-Net"] = seg_step(OfficialUNet(official), args, device)
        rows["official train_rep_C2L"] = official_step(official, args, device)
    rows["seg augmentation only"] = (augmentation_step(args, device), 0)

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in rows}
    for name, (step, _) in rows.items():
        for _ in range(args.warmup):
            print(f"warm-up: {name}", flush=True)
            timed(step)
    for round_ in range(args.repeat):
        for name, (step, _) in rows.items():
            times[name].append(timed(step))
        print(f"round {round_ + 1}/{args.repeat}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
              flush=True)

    reference = statistics.median(times["official train_rep_C2L"]) if "official train_rep_C2L" in times else None
    print(f"\nPCRL step, batch {args.batch}, crop {'x'.join(map(str, args.crop))} (D x H x W), "
          f"seg patches {'x'.join(map(str, args.patch))}, queue {args.queue}, {args.device}, {args.threads} threads")
    print(f"{'row':30} {'net params (M)':>14} {'seconds':>9} {'min':>8} {'ratio':>6}")
    for name, (_, params) in rows.items():
        median = statistics.median(times[name])
        ratio = f"{median / reference:6.2f}" if reference else "     -"
        print(f"{name:30} {params / 1e6:14.2f} {median:9.3f} {min(times[name]):8.3f} {ratio}")


if __name__ == "__main__":
    main()
