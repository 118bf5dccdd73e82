"""Building the configured backbone, loading pretrained weights into it (``--init``), and describing it in
checkpoints so a mismatch is caught by name instead of producing silent garbage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from seg.core import plugins
from seg.core.backbone import is_encoder_key
from seg.core.checkpoint import load_checkpoint
from seg.core.config import PluginChoice
from seg.core.console import info
from seg.core.errors import CheckpointError


def build_backbone(choice: PluginChoice, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The backbone named by ``choice`` with ``in_channels`` inputs and ``out_channels`` outputs."""
    return plugins.get("backbones", choice.name)(in_channels, out_channels, **choice.options)


class _SkipParameterInit(TorchFunctionMode):
    """Skips every in-place operation on a parameter (``normal_``, ``uniform_``, ``nn.init.kaiming_uniform_``,
    ...) while active: initialisation that a complete ``state_dict`` is about to overwrite anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        if isinstance(target, torch.nn.Parameter) and name.endswith("_") and not name.startswith("_"):
            return target
        return func(*args, **kwargs)


def build_with_weights(choice: PluginChoice, in_channels: int, out_channels: int, weights: dict,
                       path: Path) -> torch.nn.Module:
    """The backbone named by ``choice`` holding ``weights``, a complete ``state_dict`` (``path`` names it in
    errors). Its parameters are not randomly initialised first: for the paper's V-Net that saves 0.4 s. (A
    constructor that derived state outside the ``state_dict`` from its initial parameters would see them
    uninitialised; buffers and everything else are built as usual.)"""
    with _SkipParameterInit():
        network = build_backbone(choice, in_channels, out_channels)
    try:
        network.load_state_dict(weights)  # strict: every parameter is overwritten or this fails
    except RuntimeError as exc:  # "Error(s) in loading state_dict for X:", then what is wrong, line by line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: does not fit its backbone ({lines[min(1, len(lines) - 1)][:200]})") from None
    return network


def describe_backbone(choice: PluginChoice, in_channels: int, out_channels: int) -> dict:
    """What a checkpoint records about its network."""
    return {"name": choice.name, "options": json.dumps(choice.options, sort_keys=True),
            "in_channels": in_channels, "out_channels": out_channels}


def _label(desc: dict) -> str:
    options = json.loads(desc["options"])
    return f"{desc['name']}({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"


def check_same_backbone(path: Path, saved: dict, wanted: dict, compare_outputs: bool = True) -> None:
    """Fail with one line when a checkpoint's backbone differs from the one this run builds."""
    same = saved["name"] == wanted["name"] and saved["options"] == wanted["options"] \
        and saved["in_channels"] == wanted["in_channels"]
    if compare_outputs:
        same = same and saved["out_channels"] == wanted["out_channels"]
    if not same:
        raise CheckpointError(
            f"{path}: made with backbone {_label(saved)} ({saved['in_channels']} in, {saved['out_channels']} out), "
            f"this run uses {_label(wanted)} ({wanted['in_channels']} in, {wanted['out_channels']} out)"
        )


def backbone_weights(state: dict) -> dict:
    """The backbone's own ``state_dict`` from a pretraining (SSL task) or fine-tuning checkpoint."""
    if state.get("kind") == "pretrain":
        return {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    return dict(state["model"])


def load_pretrained(model: torch.nn.Module, path: Path, wanted: dict) -> dict:
    """Load a pretraining run's backbone into ``model``: the encoder, and the decoder where shapes match.

    Returns and reports counts of tensors loaded and skipped per part.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_latest.pt"
    state = load_checkpoint(path)
    if "backbone" not in state:
        raise CheckpointError(f"{path}: not a seg checkpoint (no backbone description)")
    check_same_backbone(path, state["backbone"], wanted, compare_outputs=False)
    source = backbone_weights(state)
    target = model.state_dict()
    report = {"encoder_loaded": 0, "decoder_loaded": 0, "skipped": []}
    for key, value in source.items():
        if key in target and target[key].shape == value.shape:
            target[key] = value
            report["encoder_loaded" if is_encoder_key(model, key) else "decoder_loaded"] += 1
        else:
            report["skipped"].append(key)
    missing_encoder = [k for k in target if is_encoder_key(model, k) and k not in source]
    if missing_encoder:
        raise CheckpointError(f"{path}: has no weights for encoder tensor {missing_encoder[0]!r}")
    model.load_state_dict(target)
    n_enc = sum(1 for k in target if is_encoder_key(model, k))
    info(f"--init {path}: loaded {report['encoder_loaded']}/{n_enc} encoder and "
         f"{report['decoder_loaded']}/{len(target) - n_enc} decoder tensors; "
         f"not loaded (shape differs): {', '.join(report['skipped']) or 'none'}")
    return report


def count_macs(model: nn.Module, shape: tuple[int, ...], within: nn.Module | None = None) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on an input of ``shape`` (C, D, H, W), on the meta
    device (no memory, no arithmetic), from (transposed) convolution hooks (only those of the submodule
    ``within``, if given). The tests check it against the V-Net's stage-by-stage count; benchmarks print it."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        taps = math.prod(module.kernel_size)
        if isinstance(module, nn.ConvTranspose3d):  # every input voxel scatters into out_channels * taps outputs
            total += inputs[0][0].numel() * module.out_channels // module.groups * taps
        else:  # every output voxel gathers in_channels * taps inputs
            total += output[0].numel() * module.in_channels // module.groups * taps

    handles = [m.register_forward_hook(hook) for m in (within or model).modules()
               if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        model.eval()(torch.empty(1, *shape, device="meta"))
    for handle in handles:
        handle.remove()
    return total
