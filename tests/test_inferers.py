"""Inferers, Gaussian weights, device and precision rules, checked against brute-force computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg.core import inference, plugins
from seg.core.errors import ConfigError
from seg.core.inference import (autocast_context, class_argmax, gaussian_importance, infer_labels,
                                 resolve_device, resolve_precision)
from seg.plugins.inferers import WholeVolume, ZSlidingWindow, roi_from_counts, window_plan, window_starts

CPU = torch.device("cpu")


def pointwise_net(classes=3, seed=0):
    """Only 1x1x1 convolutions: every voxel's output depends on that voxel alone, so windows cannot matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, classes, 1)).eval()


def context_net(classes=3, seed=0):
    """3x3x3 convolutions with zero padding: outputs near a window's ends depend on where the window is."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, classes, 3, padding=1)).eval()


def direct_softmax(net, image):
    with torch.no_grad():
        return torch.softmax(net(image), dim=1)[0]


def brute_force_blend(net, image, window, starts, divisor):
    """Pad at the ends with the image minimum, forward each window, blend with exp weights, slice by slice."""
    _, _, d, h, w = image.shape
    size = (max(d, window), -(-h // divisor) * divisor, -(-w // divisor) * divisor)
    padded = torch.full((1, 1, *size), float(image.min()))
    padded[:, :, :d, :h, :w] = image
    sigma, centre = window / 8, (window - 1) / 2
    weight = [math.exp(-0.5 * ((i - centre) / sigma) ** 2) for i in range(window)]
    numerator, denominator = None, np.zeros(size[0])
    for s in starts:
        probs = direct_softmax(net, padded[:, :, s:s + window]).double().numpy()
        if numerator is None:
            numerator = np.zeros((probs.shape[0], *size))
        for i in range(window):
            numerator[:, s + i] += weight[i] * probs[:, i]
            denominator[s + i] += weight[i]
    return torch.from_numpy(numerator / denominator[None, :, None, None])[:, :d, :h, :w]


def test_window_starts_hand_computed():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 5, 7]  # 5 windows, step 7/4 rounded (half to even)
    assert window_starts(9, 4, 0.0) == [0, 2, 5]
    assert window_starts(12, 4, 0.75) == list(range(9))
    assert window_starts(4, 4, 0.5) == [0]
    assert window_starts(3, 4, 0.5) == [0]
    for length in range(5, 40):
        starts = window_starts(length, 4, 0.5)
        assert starts[0] == 0 and starts[-1] == length - 4
        assert all(0 < b - a <= 2 for a, b in zip(starts, starts[1:]))


def test_gaussian_importance_brute_force():
    shape = (5, 4, 3)
    got = gaussian_importance(shape)
    assert got.shape == shape and got.dtype == torch.float32
    expected = np.ones(shape)
    for idx in np.ndindex(*shape):
        for i, n in zip(idx, shape):
            expected[idx] *= math.exp(-((i - (n - 1) / 2) ** 2) / (2 * (n / 8) ** 2))
    expected /= expected.max()  # even sizes have no voxel at the centre: the peak is scaled to 1
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=0)
    line = gaussian_importance((80,), sigma_scale=0.25)
    assert line.max().item() == pytest.approx(1.0) and torch.equal(line, line.flip(0))
    assert line[0].item() == pytest.approx(math.exp(-(39.5**2 - 0.5**2) / (2 * 20**2)), rel=1e-6)
    assert gaussian_importance((64,), sigma_scale=0.01).min() > 0  # underflow raised to the smallest positive


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_pointwise_network_both_inferers_give_the_direct_softmax(batch):
    net = pointwise_net()
    image = torch.randn(1, 1, 13, 6, 5)
    expected = direct_softmax(net, image)
    sliding = ZSlidingWindow(window=4, overlap=0.5, batch=batch, divisor=1)(net, image, device=CPU, precision="fp32")
    whole = WholeVolume(divisor=4)(net, image, device=CPU, precision="fp32")
    for got in (sliding, whole):
        assert got.shape == (3, 13, 6, 5) and got.dtype == torch.float32 and got.device == CPU
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_window_plan_forwards_the_fewest_slices_hand_computed():
    assert window_plan(83, 80, 0.5, 16, 1.25) == (96, [0])  # one 96-slice window, not two of 80
    assert window_plan(83, 80, 0.5, 16, 1.0) == (80, [0, 3])  # the paper's fixed window
    assert window_plan(80, 80, 0.5, 16, 1.25) == (80, [0])
    assert window_plan(40, 80, 0.5, 16, 1.25) == (80, [0])  # shorter than a window: padded to one
    assert window_plan(11, 4, 0.5, 2, 1.5) == (6, [0, 2, 5])  # 3 x 6 = 18 slices < 5 x 4 = 20
    assert window_plan(10, 4, 0.5, 2, 1.5) == (4, [0, 2, 4, 6])  # 4 x 4 = 16 < 3 x 6 = 18
    assert window_plan(200, 80, 0.5, 16, 1.25) == (80, [0, 40, 80, 120])  # 4 x 80 = 320 < 4 x 96 = 384
    assert window_plan(90, 16, 0.5, 16, 1.25) == (16, window_starts(90, 16, 0.5))  # 1.25 x 16 < 16 + 16


@pytest.mark.parametrize("depth, stretch, window, starts", [
    (3, 1.0, 4, [0]), (4, 1.0, 4, [0]), (10, 1.0, 4, [0, 2, 4, 6]), (11, 1.0, 4, [0, 2, 4, 5, 7]),
    (11, 1.5, 6, [0, 2, 5]), (5, 1.5, 6, [0]),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_context_network_matches_brute_force_blend(depth, stretch, window, starts, batch):
    net = context_net()
    image = torch.randn(1, 1, depth, 5, 6) + 3.0  # minimum far from 0: padding with 0 would show
    expected = brute_force_blend(net, image, window, starts, divisor=2)
    got = ZSlidingWindow(window=4, overlap=0.5, batch=batch, divisor=2, stretch=stretch)(
        net, image, device=CPU, precision="fp32")
    assert got.shape == (3, depth, 5, 6)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_blending_weights_matter():
    """The brute force with flat weights differs: the Gaussian test above can tell weightings apart."""
    net = context_net()
    image = torch.randn(1, 1, 10, 4, 4)
    got = ZSlidingWindow(window=4, overlap=0.5, divisor=1)(net, image, device=CPU, precision="fp32")
    flat = torch.stack([direct_softmax(net, image[:, :, s:s + 4]) for s in (0, 2, 4, 6)])
    mean = torch.zeros_like(got)
    counts = torch.zeros(10)
    for k, s in enumerate((0, 2, 4, 6)):
        mean[:, s:s + 4] += flat[k]
        counts[s:s + 4] += 1
    assert (got - mean / counts.view(1, -1, 1, 1)).abs().max() > 1e-4


def test_whole_volume_pads_with_the_minimum_and_crops():
    net = context_net()
    image = torch.randn(1, 1, 5, 6, 7) - 2.0
    padded = F.pad(image, (0, 1, 0, 2, 0, 3), value=float(image.min()))
    expected = direct_softmax(net, padded)[:, :5, :6, :7]
    got = WholeVolume(divisor=4)(net, image, device=CPU, precision="fp32")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_reduced_precision_on_cpu_returns_float16_close_to_fp32():
    net = pointwise_net()
    image = torch.randn(1, 1, 8, 4, 4)
    exact = direct_softmax(net, image)
    for inferer in (ZSlidingWindow(window=4, divisor=1), WholeVolume(divisor=1)):
        got = inferer(net, image, device=CPU, precision="bf16")
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), exact, atol=3e-2, rtol=0)


def test_network_that_changes_the_shape_is_a_config_error():
    net = nn.Conv3d(1, 2, 2, stride=2).eval()
    with pytest.raises(ConfigError, match="divisor"):
        ZSlidingWindow(window=4, divisor=1)(net, torch.randn(1, 1, 8, 6, 6), device=CPU, precision="fp32")
    with pytest.raises(ConfigError, match="divisor"):
        WholeVolume(divisor=1)(net, torch.randn(1, 1, 5, 6, 6), device=CPU, precision="fp32")


@pytest.mark.parametrize("options", [
    {"overlap": 1.0}, {"overlap": -0.1}, {"window": 0}, {"batch": 0}, {"window": 40, "divisor": 16},
    {"roi": "abdomen"}, {"roi_downsample": 0}, {"roi_margin": -1},
])
def test_bad_sliding_window_options(options):
    with pytest.raises(ConfigError, match="z_sliding_window"):
        ZSlidingWindow(**options)


def test_registered_names_and_options():
    assert plugins.get("inferers", "z_sliding_window") is ZSlidingWindow
    assert plugins.get("inferers", "whole_volume") is WholeVolume
    plugins.check_options("inferers", "z_sliding_window", {"window": 80, "overlap": 0.5, "roi": "coarse"}, "p")
    with pytest.raises(ConfigError, match="p.stride"):
        plugins.check_options("inferers", "z_sliding_window", {"stride": 2}, "p")
    with pytest.raises(ConfigError, match="whole_volume"):
        WholeVolume(divisor=0)


def test_roi_from_counts_hand_computed():
    counts = np.zeros(100, int)
    assert roi_from_counts(counts, 16, 8) is None
    counts[40:50] = 5
    assert roi_from_counts(counts, 16, 8) == (32, 58)
    counts[90] = 1  # an isolated speck far away: a smaller run, dropped
    assert roi_from_counts(counts, 16, 8) == (32, 58)
    counts[58:60] = 1  # 8 empty slices (50..57) = half a window: merged into the run
    assert roi_from_counts(counts, 16, 8) == (32, 68)
    big = np.zeros(100, int)
    big[10:12], big[21:23] = 1, 100  # 9 empty slices: two runs, the one with more voxels wins
    assert roi_from_counts(big, 16, 2) == (14, 30)  # (19, 25) widened to one window
    one = np.zeros(100, int)
    one[1] = 1
    assert roi_from_counts(one, 16, 2) == (0, 16)
    one[1], one[98] = 0, 1
    assert roi_from_counts(one, 16, 2) == (84, 100)
    assert roi_from_counts(np.ones(10, int), 16, 8) == (0, 10)


class IntensityNet(nn.Module):
    """Class 1 wherever the input exceeds 0.5, else class 0 (class 2 never): a 1x1x1 convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 20.0, 0.0]).view(3, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -10.0, -5.0]))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.conv(x)


def test_roi_coarse_background_outside_and_full_result_inside():
    image = torch.rand(1, 1, 100, 8, 8) * 0.4
    image[:, :, 40:50, 2:6, 2:6] = 1.0
    net = IntensityNet()
    full = ZSlidingWindow(window=16, divisor=1)(net, image, device=CPU, precision="fp32")
    full_slices = sum(shape[0] * shape[2] for shape in net.seen)
    net.seen.clear()
    got = ZSlidingWindow(window=16, divisor=1, roi="coarse")(net, image, device=CPU, precision="fp32")
    coarse = [s for s in net.seen if s[3:] == (4, 4)]
    fine = [s for s in net.seen if s[3:] == (8, 8)]
    assert len(coarse) + len(fine) == len(net.seen) and sum(s[0] * s[2] for s in coarse) >= 100
    assert sum(s[0] * s[2] for s in fine) < full_slices / 2
    z0, z1 = 32, 58  # foreground 40..49 widened by half a window
    background = torch.zeros(3, 1, 1, 1)
    background[0] = 1
    assert torch.equal(got[:, :z0], background.expand(3, z0, 8, 8))
    assert torch.equal(got[:, z1:], background.expand(3, 100 - z1, 8, 8))
    torch.testing.assert_close(got[:, z0:z1], full[:, z0:z1], atol=1e-6, rtol=0)
    assert (got.argmax(0) == 1).sum() == 160


def test_roi_coarse_labels_when_the_fine_range_is_one_window():
    image = torch.rand(1, 1, 100, 8, 8) * 0.4
    image[:, :, 40:50, 2:6, 2:6] = 1.0
    inferer = ZSlidingWindow(window=48, divisor=1, roi="coarse")  # fine range 16..74: one stretched window
    assert len(window_plan(58, 48, 0.5, 1, 1.25)[1]) == 1
    labels = inferer.labels(IntensityNet(), image, device=CPU, precision="fp32")
    probs = inferer(IntensityNet(), image, device=CPU, precision="fp32")
    assert torch.equal(labels, probs.argmax(0).to(torch.uint8))
    assert labels[40:50, 2:6, 2:6].eq(1).all() and labels.sum() == 160


def test_roi_coarse_without_foreground_falls_back_to_the_full_run():
    image = torch.rand(1, 1, 40, 4, 4) * 0.4
    net = IntensityNet()
    full = ZSlidingWindow(window=8, divisor=1)(net, image, device=CPU, precision="fp32")
    got = ZSlidingWindow(window=8, divisor=1, roi="coarse", roi_downsample=1)(net, image, device=CPU,
                                                                              precision="fp32")
    torch.testing.assert_close(got, full, atol=0, rtol=0)


def test_precision_rules(monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_precision("auto", CPU) == "fp32" and resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("fp16", CPU) == "fp32" and resolve_precision("bf16", CPU) == "fp32"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("fp16", CPU) == "bf16" and resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", cuda) == "fp16" and resolve_precision("fp32", cuda) == "fp32"
    monkeypatch.setattr(inference, "cuda_has_bf16", lambda: False)
    assert resolve_precision("bf16", cuda) == "fp16"
    monkeypatch.setattr(inference, "cuda_has_bf16", lambda: True)
    assert resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        resolve_precision("fp8", CPU)


def test_device_rules(monkeypatch):
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match="'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_autocast_context_on_cpu():
    layer = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with autocast_context(CPU, "fp32"):
        assert layer(x).dtype == torch.float32
    with autocast_context(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 autocast path)")
def test_fp16_on_cuda_matches_fp32_on_cpu():
    net = context_net(classes=4)
    image = torch.randn(1, 1, 37, 32, 32)
    reference = ZSlidingWindow(window=16)(net, image, device=CPU, precision="fp32")
    gpu = torch.device("cuda")
    assert resolve_precision("auto", gpu) == "fp16"
    net.to(gpu)
    for inferer in (ZSlidingWindow(window=16, batch=2), ZSlidingWindow(window=16, roi="coarse"),
                    WholeVolume()):
        got = inferer(net, image, device=gpu, precision="fp16")
        assert got.dtype == torch.float16 and got.device == CPU and got.shape == (4, 37, 32, 32)
        if isinstance(inferer, WholeVolume) or inferer.roi:
            continue
        torch.testing.assert_close(got.float(), reference, atol=1e-2, rtol=0)


@pytest.mark.parametrize("roi", [None, "coarse"])
@pytest.mark.parametrize("depth", [3, 7, 30])  # 3: one window, labels straight from its logits
def test_labels_are_the_argmax_of_the_probabilities_without_holding_them(roi, depth):
    net = context_net()
    image = torch.randn(1, 1, depth, 5, 6)
    image[:, :, depth // 3:depth // 2] += 2.0
    inferer = ZSlidingWindow(window=4, overlap=0.5, divisor=2, roi=roi)
    probs = inferer(net, image, device=CPU, precision="fp32")
    labels = inferer.labels(net, image, device=CPU, precision="fp32")
    assert labels.dtype == torch.uint8 and labels.shape == (depth, 5, 6)
    top2 = probs.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5  # where probabilities nearly tie, either argmax is right
    assert clear.float().mean() > 0.95
    assert torch.equal(labels[clear], probs.argmax(0).to(torch.uint8)[clear])


def test_infer_labels_falls_back_to_the_argmax_of_an_inferer_without_labels():
    net = pointwise_net()
    image = torch.randn(1, 1, 6, 4, 4)
    whole = WholeVolume(divisor=2)
    got = infer_labels(whole, net, image, device=CPU, precision="fp32")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, direct_softmax(net, image).argmax(0).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_class_argmax_matches_numpy_argmax_and_breaks_ties_low(dtype):
    scores = torch.rand(7, 5, 6, 4).to(dtype)
    scores[3, 0, 0, 0] = scores[5, 0, 0, 0] = scores[:, 0, 0, 0].max()  # a tie between classes 3 and 5
    scores[:, 1, 1, 1] = 0.25  # all tied: background
    got = class_argmax(scores)
    assert got.dtype == torch.uint8 and got.shape == (5, 6, 4)
    assert np.array_equal(got.numpy(), np.argmax(scores.float().numpy(), axis=0))
    assert got[0, 0, 0] == 3 and got[1, 1, 1] == 0


def test_class_argmax_tolerance_prefers_the_lowest_class_within_it():
    scores = torch.tensor([[0.3, 0.1], [0.5, 0.5 - 1e-7], [0.5 - 5e-7, 0.5]])
    assert class_argmax(scores).tolist() == [1, 2]
    assert class_argmax(scores, tolerance=1e-6).tolist() == [1, 1]
    with pytest.raises(ValueError, match="257 classes"):
        class_argmax(torch.zeros(257, 2))
