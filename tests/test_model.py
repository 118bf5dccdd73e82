"""Building backbones: with a checkpoint's weights and no random initialisation first."""

import pytest
import torch
from torch import nn

from seg.core import plugins
from seg.core.config import PluginChoice
from seg.core.errors import CheckpointError
from seg.core.model import build_backbone, build_with_weights


class WithBuffers(nn.Module):
    """Parameters initialised in place, a persistent and a non-persistent buffer filled in place."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3)
        nn.init.trunc_normal_(self.conv.weight)
        self.register_buffer("scale", torch.empty(out_channels).fill_(2.0))
        self.register_buffer("table", torch.arange(4.0).mul_(3), persistent=False)


def test_weights_are_the_checkpoints_and_buffers_are_computed(monkeypatch):
    monkeypatch.setattr(plugins, "get", lambda family, name: WithBuffers)
    choice = PluginChoice("with_buffers", {})
    source = build_backbone(choice, 1, 2)
    weights = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    built = build_with_weights(choice, 1, 2, weights, "ckpt.pt")
    assert all(torch.equal(built.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(built.table, torch.tensor([0.0, 3.0, 6.0, 9.0]))  # not in the state_dict: still built
    again = build_backbone(choice, 1, 2)  # initialisation outside is untouched
    assert again.scale.eq(2.0).all() and not torch.equal(again.conv.weight, source.conv.weight)


def test_parameters_are_not_initialised(monkeypatch):
    filled = []
    original = torch.Tensor.normal_

    def spy(self, *args, **kwargs):
        filled.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    choice = PluginChoice("vnet", {"base_channels": 2, "depth": 2})
    weights = build_backbone(choice, 1, 3).state_dict()
    assert filled  # the vnet initialises its convolutions with normal_ ...
    filled.clear()
    build_with_weights(choice, 1, 3, weights, "ckpt.pt")
    assert not filled  # ... which is skipped here


def test_incomplete_or_mismatched_weights_are_one_line_errors():
    choice = PluginChoice("vnet", {"base_channels": 2, "depth": 2})
    weights = build_backbone(choice, 1, 3).state_dict()
    del weights["head.bias"]
    with pytest.raises(CheckpointError, match=r"ckpt.pt: does not fit its backbone .*head.bias"):
        build_with_weights(choice, 1, 3, weights, "ckpt.pt")
    with pytest.raises(CheckpointError, match="ckpt.pt: does not fit"):
        build_with_weights(choice, 1, 4, build_backbone(choice, 1, 3).state_dict(), "ckpt.pt")
