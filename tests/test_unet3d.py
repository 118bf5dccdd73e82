"""The ``unet3d`` backbone: protocol, shapes, initialisation, errors (generic checks from test_vnet)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seg.core import plugins
from seg.core.errors import ConfigError
from seg.plugins.unet3d import UNet3D
from tests.test_vnet import (
    check_bad_size, check_encoder_partition, check_he_init, check_protocol, check_trains)

TINY = dict(base_channels=4, depth=3)


def test_protocol_and_shapes():
    check_protocol(UNet3D(1, 3, **TINY), 1, 3)
    check_protocol(UNet3D(2, 3, base_channels=4, depth=4), 2, 4)


def test_widths_and_size():
    model = UNet3D(1, 3, base_channels=4, depth=4, max_channels=16)
    assert [f.shape[1] for f in model.encode(torch.randn(1, 1, 16, 16, 16))] == [4, 8, 16, 16]
    # by hand: stem 1->4, then per level a down conv (none at level 0) and a block of two 3x3x3 convs,
    # each with a 2-parameter-per-channel instance norm; up: transposed conv, block 2w->w with projection.
    widths, params = [4, 8, 16, 16], 27 * 4 + 8
    for level, w in enumerate(widths):
        if level:
            params += 27 * widths[level - 1] * w + 2 * w
        params += 2 * (27 * w * w + 2 * w)
    for level in range(3):
        w = widths[level]
        params += 8 * widths[level + 1] * w + 27 * 2 * w * w + 2 * w + 27 * w * w + 2 * w + 2 * w * w
    params += 4 * 3 + 3
    assert sum(p.numel() for p in model.parameters()) == params


def test_encoder_partition():
    check_encoder_partition(UNet3D(1, 3, **TINY), 1)


def test_he_init():
    check_he_init(UNet3D(1, 3, base_channels=8, depth=3), math.sqrt(2.0 / (1 + 0.01**2)))


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_tiny_training_steps(norm):
    check_trains(UNet3D(1, 3, norm=norm, **TINY), 1)


def test_bad_input_size_and_options():
    check_bad_size(UNet3D(1, 3, **TINY), 1, 4)
    with pytest.raises(ConfigError, match="norm"):
        UNet3D(1, 3, norm="layer")
    with pytest.raises(ConfigError, match="depth"):
        UNet3D(1, 3, depth=1)


def test_differs_from_vnet():
    kinds = {type(m) for m in UNet3D(1, 3, **TINY).modules()}
    assert nn.LeakyReLU in kinds and nn.PReLU not in kinds


def test_registered():
    assert plugins.get("backbones", "unet3d") is UNet3D
