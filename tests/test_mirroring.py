"""Test-time mirroring (the ``mirror`` option of both inferers), checked against a hand computation: flipping
the input of a convolution along an axis and flipping its output back is the same as convolving with the
kernel mirrored along that axis, so the mirrored mean is a mean of numpy convolutions with flipped kernels."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from seg.core import plugins
from seg.core.config import load_experiment
from seg.core.errors import ConfigError
from seg.plugins.inferers import WholeVolume, ZSlidingWindow, mirror_flips

CPU = torch.device("cpu")
ARRAY_AXIS = {"z": 0, "y": 1, "x": 2}  # axes of a (z, y, x) kernel


def conv_net(classes=3, seed=0):
    """One 3x3x3 convolution with random (non-symmetric) kernels and zero padding."""
    torch.manual_seed(seed)
    return nn.Conv3d(1, classes, 3, padding=1).double().eval()


def symmetric_net(classes=3, seed=0):
    """A two-layer network whose kernels are symmetric under every flip: it commutes with flips."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, classes, 3, padding=1)).double()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            w = layer.weight
            layer.weight.copy_(sum(w.flip(dims) for n in range(4) for dims in itertools.combinations((2, 3, 4), n)))
    return net.eval()


def hand_mirrored(net: nn.Conv3d, image: np.ndarray, axes) -> np.ndarray:
    """Mean over every subset of ``axes`` of softmax(correlation of ``image`` (z, y, x) with the kernels
    mirrored along that subset), in float64 numpy, zero padding: probabilities (K, z, y, x)."""
    kernels = net.weight.detach().numpy()[:, 0]
    bias = net.bias.detach().numpy()
    padded = np.pad(image, 1)
    shape = image.shape
    total = np.zeros((len(kernels), *shape))
    subsets = [s for n in range(len(axes) + 1) for s in itertools.combinations(axes, n)]
    for subset in subsets:
        flipped = np.flip(kernels, [1 + ARRAY_AXIS[a] for a in subset]) if subset else kernels
        logits = np.zeros_like(total) + bias[:, None, None, None]
        for dz, dy, dx in itertools.product(range(3), repeat=3):
            window = padded[dz:dz + shape[0], dy:dy + shape[1], dx:dx + shape[2]]
            logits += flipped[:, dz, dy, dx, None, None, None] * window
        e = np.exp(logits - logits.max(0))
        total += e / e.sum(0)
    return total / len(subsets)


def hand_blend(probs_of, image: np.ndarray, window: int, starts) -> np.ndarray:
    """Gaussian-weighted mean along z of ``probs_of(window image)`` over windows at ``starts``."""
    sigma, centre = window / 8, (window - 1) / 2
    weight = np.exp(-0.5 * ((np.arange(window) - centre) / sigma) ** 2)
    numerator, denominator = None, np.zeros(image.shape[0])
    for s in starts:
        probs = probs_of(image[s:s + window])
        numerator = np.zeros((len(probs), *image.shape)) if numerator is None else numerator
        numerator[:, s:s + window] += weight[None, :, None, None] * probs
        denominator[s:s + window] += weight
    return numerator / denominator[None, :, None, None]


@pytest.mark.parametrize("axes", [["x"], ["y"], ["z"], ["x", "z"], ["z", "y", "x"]])
def test_whole_volume_mirroring_matches_the_hand_computation(axes):
    net = conv_net()
    image = np.random.default_rng(1).normal(size=(6, 5, 7))
    got = WholeVolume(divisor=1, mirror=axes)(net, torch.from_numpy(image)[None, None], device=CPU, precision="fp32")
    np.testing.assert_allclose(got.numpy(), hand_mirrored(net, image, axes), atol=1e-6, rtol=0)
    plain = hand_mirrored(net, image, [])
    assert np.abs(got.numpy() - plain).max() > 1e-2  # the network is not symmetric: mirroring changes scores


def test_sliding_window_mirroring_matches_the_hand_computation():
    net = conv_net()
    image = np.random.default_rng(2).normal(size=(11, 4, 6))
    inferer = ZSlidingWindow(window=4, overlap=0.5, divisor=2, stretch=1, mirror=["x", "z"])
    got = inferer(net, torch.from_numpy(image)[None, None], device=CPU, precision="fp32")
    # windows of 4 slices at 0, 2, 4, 5, 7 (tests/test_inferers.py); each window is mirrored on its own
    expected = hand_blend(lambda w: hand_mirrored(net, w, ["x", "z"]), image, 4, [0, 2, 4, 5, 7])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)
    labels = inferer.labels(net, torch.from_numpy(image)[None, None], device=CPU, precision="fp32")
    np.testing.assert_array_equal(labels.numpy(), expected.argmax(0))


def test_one_window_labels_path_is_the_argmax_of_the_mirrored_mean():
    net = conv_net()
    image = np.random.default_rng(3).normal(size=(4, 6, 6))  # one window: labels straight from the network
    inferer = ZSlidingWindow(window=4, divisor=2, mirror=["y"])
    labels = inferer.labels(net, torch.from_numpy(image)[None, None], device=CPU, precision="fp32")
    expected = hand_mirrored(net, image, ["y"])
    np.testing.assert_array_equal(labels.numpy(), expected.argmax(0))
    assert not np.array_equal(labels.numpy(), hand_mirrored(net, image, []).argmax(0))


class HandMirrored(nn.Module):
    """``net`` evaluated on its input and every flip of it, flipped back; returns log of the mean softmax."""

    def __init__(self, net, dims):
        super().__init__()
        self.net, self.dims = net, dims

    def forward(self, x):
        subsets = [s for n in range(len(self.dims) + 1) for s in itertools.combinations(self.dims, n)]
        probs = [torch.softmax(self.net(x.flip(s)), 1).flip(s) if s else torch.softmax(self.net(x), 1)
                 for s in subsets]
        return torch.stack(probs).mean(0).log()


@pytest.mark.parametrize("roi", [None, "coarse"])
def test_every_path_mirrors_like_a_mirrored_network(roi):
    net = conv_net(classes=4)
    with torch.no_grad():
        net.bias[0] = 6.0  # background except where the image is bright (class 1 responds to brightness)
        net.weight[1] += 0.5
    image = torch.from_numpy(np.random.default_rng(4).normal(size=(40, 8, 8)))[None, None]
    image[:, :, 12:20] += 4.0
    options = dict(window=8, divisor=2, roi=roi, roi_downsample=1)
    mirrored = ZSlidingWindow(mirror=["x", "y"], **options)
    reference = ZSlidingWindow(**options)
    wrapped = HandMirrored(net, (3, 4)).eval()
    if roi:  # the coarse pass found a z-range short of the whole scan: the restricted path is exercised
        z_range, _ = mirrored._coarse_range(net, image, CPU, "fp32", float(image.min()))
        assert z_range is not None and z_range != (0, 40), z_range
    got = mirrored(net, image, device=CPU, precision="fp32")
    torch.testing.assert_close(got, reference(wrapped, image, device=CPU, precision="fp32"), atol=1e-6, rtol=0)
    labels = mirrored.labels(net, image, device=CPU, precision="fp32")
    assert torch.equal(labels, reference.labels(wrapped, image, device=CPU, precision="fp32"))


@pytest.mark.parametrize("make", [
    lambda mirror: WholeVolume(divisor=2, mirror=mirror),
    lambda mirror: ZSlidingWindow(window=4, divisor=2, mirror=mirror),
    lambda mirror: ZSlidingWindow(window=4, divisor=2, roi="coarse", roi_downsample=1, mirror=mirror),
])
def test_a_flip_equivariant_network_gives_the_same_scores(make):
    net = symmetric_net()
    image = torch.from_numpy(np.random.default_rng(5).normal(size=(13, 6, 8)))[None, None]
    image[:, :, 4:9] += 2.0
    plain = make([])(net, image, device=CPU, precision="fp32")
    for mirror in (["x"], ["z", "y"], ["x", "y", "z"]):
        torch.testing.assert_close(make(mirror)(net, image, device=CPU, precision="fp32"), plain, atol=1e-6, rtol=0)


def test_mirror_at_reduced_precision_returns_float16_close_to_fp32():
    net = conv_net().float()
    image = torch.randn(1, 1, 9, 6, 6)
    exact = ZSlidingWindow(window=4, divisor=2, mirror=["x"])(net, image, device=CPU, precision="fp32")
    got = ZSlidingWindow(window=4, divisor=2, mirror=["x"])(net, image, device=CPU, precision="bf16")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), exact, atol=3e-2, rtol=0)


def test_mirror_flips_lists_every_non_empty_combination():
    assert mirror_flips([]) == []
    assert mirror_flips(["x"]) == [(4,)]
    assert mirror_flips(["x", "z"]) == [(4,), (2,), (4, 2)]
    assert len(mirror_flips(["x", "y", "z"])) == 7


@pytest.mark.parametrize("factory, name", [(ZSlidingWindow, "z_sliding_window"), (WholeVolume, "whole_volume")])
@pytest.mark.parametrize("mirror", ["x", ["w"], ["x", "x"], [1], ["X"], None])
def test_bad_mirror_values_name_the_option(factory, name, mirror):
    with pytest.raises(ConfigError, match=rf"inferer {name}: mirror=.* must be a list of distinct axes"):
        factory(mirror=mirror)


def test_bad_mirror_in_an_experiment_is_refused_naming_the_option():
    exp = load_experiment("smoke", ['predict.inferer.options.mirror=["x", "q"]'])
    with pytest.raises(ConfigError, match=r"mirror=\['x', 'q'\]"):
        plugins.get("inferers", exp.predict.inferer.name)(**exp.predict.inferer.options)
    assert load_experiment("flare22-pcrl-vnet").predict.inferer.options.get("mirror", []) == []  # off in the paper
