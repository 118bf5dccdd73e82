"""The ``vnet`` backbone: protocol, shapes, initialisation, errors, and the paper's size counted independently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg.core import plugins
from seg.core.backbone import EncoderDecoder, is_encoder_key
from seg.core.errors import ConfigError
from seg.core.model import count_macs
from seg.plugins.vnet import VNet

TINY = dict(base_channels=4, depth=3)



def vnet_size(in_ch, out_ch, base, convs, voxels):
    """Parameters and MACs of the documented V-Net layout, counted stage by stage (batch norm, PReLU)."""
    widths = [base * 2**level for level in range(len(convs))]
    params, macs = 0, 0

    def conv(cin, cout, taps, out_voxels, extra, taps_per_output=None):  # extra: norm (2 c) + PReLU (c) or bias
        nonlocal params, macs
        params += cin * cout * taps + extra
        macs += out_voxels * cin * cout * (taps if taps_per_output is None else taps_per_output)

    for level, (w, n) in enumerate(zip(widths, convs)):
        v = voxels / 8**level
        if level == 0:
            conv(in_ch, w, 125, v, 3 * w)
        else:
            conv(widths[level - 1], w, 8, v, 3 * w)
            conv(w, w, 125, v, 3 * w)
        for _ in range(n - 1):
            conv(w, w, 125, v, 3 * w)
    for level in reversed(range(len(convs) - 1)):
        w, v = widths[level], voxels / 8**level
        cin = widths[level + 1] * (1 if level == len(convs) - 2 else 2)
        conv(cin, w, 8, v, 3 * w, taps_per_output=1)  # transposed 2x2x2 stride 2: one tap reaches each output
        for _ in range(convs[level]):
            conv(2 * w, 2 * w, 125, v, 6 * w)
    conv(2 * widths[0], out_ch, 1, voxels, out_ch)
    return params, macs


def test_paper_size():
    with torch.device("meta"):
        model = VNet(1, 14)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, (1, 80, 160, 160))
    assert (params, macs) == vnet_size(1, 14, 16, (1, 1, 2, 2, 2), 80 * 160 * 160)
    assert params == pytest.approx(43.60e6, rel=0.02)  # the paper's Table 2
    assert macs == pytest.approx(690.7e9, rel=1e-3)  # the paper's 218.7 G is impossible here, see vnet.py:
    finest = count_macs(model, (1, 80, 160, 160), within=model.decoder[-1].body)  # counted in the forward pass
    assert finest == pytest.approx(262.1e9, rel=1e-3) and finest > 218.7e9  # the finest up stage alone exceeds it


def test_milletari_layout_size():
    with torch.device("meta"):
        model = VNet(1, 2, convs=[1, 2, 3, 3, 3])
    params = sum(p.numel() for p in model.parameters())
    assert (params, count_macs(model, (1, 16, 32, 32))) == vnet_size(1, 2, 16, (1, 2, 3, 3, 3), 16 * 32 * 32)


# Generic checks, shared with tests/test_unet3d.py.

def check_protocol(model: nn.Module, in_ch: int, depth: int, size: int = 16):
    torch.manual_seed(0)
    x = torch.randn(2, in_ch, size, size, size)
    model.eval()
    assert isinstance(model, EncoderDecoder)
    features = model.encode(x)
    assert len(features) == depth
    assert [f.shape[2] for f in features] == [size // 2**level for level in range(depth)]
    out = model(x)
    assert out.shape == (2, 3, size, size, size)
    assert torch.equal(out, model.decode(features))


def check_encoder_partition(model: nn.Module, in_ch: int):
    """Encoder keys are exactly the parameters that ``encode`` depends on."""
    model.eval()
    keys = list(model.state_dict())
    encoder = [k for k in keys if is_encoder_key(model, k)]
    assert encoder and len(encoder) < len(keys)
    assert set(model.encoder_modules()) <= {name for name, _ in model.named_children()}
    x = torch.randn(1, in_ch, 16, 16, 16)
    before = [f.clone() for f in model.encode(x)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_encoder_key(model, name):
                p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.encode(x)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_encoder_key(model, name):
                saved = p.clone()
                p.add_(1.0)
                assert not torch.equal(before[-1], model.encode(x)[-1]), name
                p.copy_(saved)


def check_he_init(model: nn.Module, gain: float):
    """Each large (transposed) convolution: mean ~0, std ~gain / sqrt(fan-in), zero bias."""
    checked = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and m.weight.numel() >= 4000:
            w = m.weight.detach().double()
            transposed = isinstance(m, nn.ConvTranspose3d)
            fan_in = w.shape[0] if transposed else w[0].numel()  # 2x2x2 stride 2: one tap per input channel
            assert w.mean().abs() < 4 * w.std() / math.sqrt(w.numel())
            assert w.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.1)
            assert m.bias is None or not m.bias.any()
            checked += 1
    assert checked >= 3


def check_trains(model: nn.Module, in_ch: int):
    """A few Adam steps on a fixed tiny batch lower the cross-entropy, with finite gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, in_ch, 8, 8, 8)
    y = (x[:, 0] > 0).long() + (x[:, 0] > 1).long()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def check_bad_size(model: nn.Module, in_ch: int, multiple: int):
    with pytest.raises(ConfigError, match=f"divisible by {multiple} "):
        model(torch.randn(1, in_ch, 16, 16, multiple + 2))


def test_protocol_and_shapes():
    check_protocol(VNet(1, 3, **TINY), 1, 3)
    check_protocol(VNet(3, 3, base_channels=4, depth=4), 3, 4)  # input tiled 2x then cut to 4 channels


def test_encoder_partition():
    check_encoder_partition(VNet(1, 3, **TINY), 1)


def test_he_init():
    check_he_init(VNet(1, 3, base_channels=8, depth=3), math.sqrt(2.0))


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_tiny_training_steps(norm):
    check_trains(VNet(1, 3, norm=norm, **TINY), 1)


def test_bad_input_size_and_options():
    check_bad_size(VNet(1, 3, **TINY), 1, 4)
    with pytest.raises(ConfigError, match="norm"):
        VNet(1, 3, norm="group")
    with pytest.raises(ConfigError, match="convs"):
        VNet(1, 3, depth=3, convs=[1, 2])


def test_registered():
    assert plugins.get("backbones", "vnet") is VNet


@pytest.mark.parametrize("slopes", [[0.25, 0.1, 2.0], [0.25, -0.5, 0.0]])
def test_in_place_prelu_matches_torch(slopes):
    from seg.plugins.vnet import InPlacePReLU

    ours, reference = InPlacePReLU(3), nn.PReLU(3)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor(slopes))
        reference.weight.copy_(torch.tensor(slopes))
    x = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, 4)
    expected = reference(x)
    expected.backward(g)
    x_grad, w_grad = x.grad.clone(), reference.weight.grad
    x.grad = None
    fresh = x * 1.0  # as after a normalisation
    out = ours(fresh)
    assert (out.data_ptr() == fresh.data_ptr()) == (min(slopes) > 0)  # in place exactly when valid
    out.backward(g)
    assert torch.allclose(out, expected) and torch.allclose(x.grad, x_grad)
    assert torch.allclose(ours.weight.grad, w_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slopes", [[0.25, 0.1, 2.0], [0.25, -0.5, 0.0]])
def test_in_place_prelu_without_autograd_matches_torch(slopes):
    from seg.plugins.vnet import InPlacePReLU

    ours = InPlacePReLU(3)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor(slopes))
        x = torch.randn(2, 3, 4, 4, 4)
        expected = torch.nn.functional.prelu(x, torch.tensor(slopes))
        out = ours(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_matrix_product_layers_match_torch_convolutions(bias):
    from seg.plugins.vnet import PointwiseConv3d, UpConv3d

    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    g_up, g_head = torch.randn(2, 4, 6, 8, 10), torch.randn(2, 4, 3, 4, 5)
    up, head = UpConv3d(6, 4, bias=bias), PointwiseConv3d(6, 4)
    for layer, reference, grad in ((up, lambda w, b: F.conv_transpose3d(x, w, b, stride=2), g_up),
                                   (head, lambda w, b: F.conv3d(x, w, b), g_head)):
        weight = layer.weight.detach().clone().requires_grad_()
        b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
        expected = reference(weight, b)
        (expected * grad).sum().backward()
        x_grad, x.grad = x.grad.clone(), None
        out = layer(x)
        (out * grad).sum().backward()
        assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(x.grad, x_grad, atol=1e-5) and torch.allclose(layer.weight.grad, weight.grad, atol=1e-5)
        if b is not None:
            assert torch.allclose(layer.bias.grad, b.grad, atol=1e-5)
        x.grad = None


def test_input_stage_residual_is_the_input_on_every_channel():
    from seg.plugins.vnet import InputStage

    stage = InputStage(1, 4, 1, "none").eval()
    x = torch.randn(1, 1, 4, 4, 4)
    conv, act = stage.body.convs[0], stage.body.acts[0]
    with torch.no_grad():
        expected = F.prelu(F.conv3d(x, conv.weight, conv.bias, padding=2) + x, act.weight)
        assert torch.allclose(stage(x), expected, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_for_inference_folds_batch_norms_and_computes_the_same_function(norm):
    torch.manual_seed(0)
    network = VNet(1, 3, norm=norm, **TINY)
    network.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics far from their initial 0 / 1
            network(torch.randn(2, 1, 8, 8, 8) * 3 + 1)
        for m in network.modules():
            if isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d)):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = network.eval()(x)
        folded = network.for_inference()
        assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
        assert torch.allclose(folded(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("transposed", [True, False])
def test_fold_norm_matches_convolution_then_eval_batch_norm(affine, transposed):
    from seg.plugins.vnet import fold_norm

    torch.manual_seed(1)
    conv = (nn.ConvTranspose3d(3, 4, 2, stride=2) if transposed else nn.Conv3d(3, 4, 3, padding=1, bias=False))
    norm = nn.BatchNorm3d(4, affine=affine).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        if affine:
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
        x = torch.randn(2, 3, 4, 4, 4)
        expected = norm(conv(x))
        folded, identity = fold_norm(conv, norm)
        assert isinstance(identity, nn.Identity)
        assert torch.allclose(identity(folded(x)), expected, atol=1e-5)


def test_kernel_size_three_keeps_the_layout_and_the_inference_rearrangement():
    """``kernel_size = 3`` (the phantom experiments): every stage convolution is 3x3x3 with padding 1, the
    parameter count is the 5x5x5 network's with 27 instead of 125 taps per stage weight, and the folded
    inference network computes the same function."""
    from seg.plugins.vnet import VNet

    small, paper = VNet(1, 3, base_channels=4, depth=3, kernel_size=3), VNet(1, 3, base_channels=4, depth=3)
    stage_convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (2, 2, 2)
                   and m.kernel_size != (1, 1, 1)]
    assert stage_convs and all(m.kernel_size == (3, 3, 3) and m.padding == (1, 1, 1) for m in stage_convs)
    taps = {3: 0, 5: 0}
    for net, k in ((small, 3), (paper, 5)):
        taps[k] = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (k,) * 3)
    assert taps[3] * 125 == taps[5] * 27
    x = torch.randn(2, 1, 8, 16, 16)
    small.train()
    small(x)  # batch statistics move away from their initial values
    small.eval()
    with torch.no_grad():
        expected = small(x)
        torch.testing.assert_close(small.for_inference()(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="kernel_size"):
        VNet(1, 3, kernel_size=4)
