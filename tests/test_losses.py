"""The losses against a straightforward numpy implementation, by hand, and against MONAI when installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seg.core import plugins
from seg.core.errors import ConfigError, DataError
from seg.plugins.losses import CrossEntropy, DiceCE, GeneralizedDiceCE


def numpy_terms(logits, labels, include_background=True, batch=False, smooth=1e-5):
    """Cross-entropy, soft Dice and generalized Dice from one-hot arrays and explicit loops."""
    logits, labels = logits.astype(np.float64), labels.astype(np.int64)
    b, c = logits.shape[:2]
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    onehot = np.stack([(labels == k) for k in range(c)], 1).astype(np.float64)
    ce = -np.mean(np.log(np.take_along_axis(p, labels[:, None], 1)))
    axes = (0, 2, 3, 4) if batch else (2, 3, 4)
    tp, psum, ysum = (x.sum(axes) for x in (p * onehot, p, onehot))
    if batch:
        tp, psum, ysum = tp[None], psum[None], ysum[None]
    first = 0 if include_background else 1
    tp, psum, ysum = tp[:, first:], psum[:, first:], ysum[:, first:]
    dice = 1 - np.mean((2 * tp + smooth) / (psum + ysum + smooth))
    gdice = []
    for s in range(tp.shape[0]):
        w = np.array([1 / v**2 if v > 0 else np.nan for v in ysum[s]])
        finite = w[~np.isnan(w)]
        w = np.where(np.isnan(w), finite.max() if finite.size else 0.0, w)
        gdice.append(1 - (2 * np.sum(w * tp[s]) + smooth) / (np.sum(w * (psum[s] + ysum[s])) + smooth))
    return ce, dice, float(np.mean(gdice))


def sample(num_classes=4, absent=(), seed=0, shape=(2, 3, 4, 5)):
    """Random logits and labels with the classes in ``absent`` missing from the labels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (shape[0], num_classes, *shape[1:])).astype(np.float32)
    present = [k for k in range(num_classes) if k not in absent]
    labels = rng.choice(present, size=shape)
    return logits, labels


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("absent", [(), (2,), (1, 3)])
def test_losses_match_numpy(include_background, batch, absent):
    logits, labels = sample(absent=absent)
    ce, dice, gdice = numpy_terms(logits, labels, include_background, batch)
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    opts = dict(include_background=include_background, batch=batch)
    assert CrossEntropy(4)(x, y).item() == pytest.approx(ce, rel=1e-5)
    assert DiceCE(4, **opts)(x, y).item() == pytest.approx(dice + ce, rel=1e-5)
    assert GeneralizedDiceCE(4, **opts)(x, y).item() == pytest.approx(gdice + ce, rel=1e-5)
    weighted = GeneralizedDiceCE(4, dice_weight=0.3, ce_weight=2.0, **opts)(x, y).item()
    assert weighted == pytest.approx(0.3 * gdice + 2.0 * ce, rel=1e-5)


def test_generalized_dice_by_hand():
    # One sample, 2 classes, 4 voxels; logits +-inf-like so p is one-hot: p = [1, 1, 0, 0] for class 1.
    logits = torch.tensor([[-20.0, -20.0, 20.0, 20.0], [20.0, 20.0, -20.0, -20.0]]).view(1, 2, 1, 1, 4)
    labels = torch.tensor([1, 0, 0, 0]).view(1, 1, 1, 4)
    # class 0: |y|=3, tp=2, sum p=2, w=1/9; class 1: |y|=1, tp=1, sum p=2, w=1
    # GD = 1 - 2 (2/9 + 1) / ((2+3)/9 + (2+1)) = 1 - (22/9) / (32/9) = 10/32
    loss = GeneralizedDiceCE(2, ce_weight=0.0, smooth=0.0)(logits, labels)
    assert loss.item() == pytest.approx(10 / 32, rel=1e-6)
    # soft Dice: class 0: 2*2/(2+3) = 0.8; class 1: 2*1/(2+1) = 2/3 -> 1 - (0.8 + 2/3) / 2
    loss = DiceCE(2, ce_weight=0.0, smooth=0.0)(logits, labels)
    assert loss.item() == pytest.approx(1 - (0.8 + 2 / 3) / 2, rel=1e-6)


@pytest.mark.parametrize("factory", [GeneralizedDiceCE, DiceCE, CrossEntropy])
def test_gradients_finite_with_absent_classes(factory):
    logits, labels = sample(num_classes=5, absent=(1, 2, 4))
    x = torch.from_numpy(logits).requires_grad_()
    loss = factory(5)(x, torch.from_numpy(labels))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_only_background_without_background_is_finite():
    x = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    loss = GeneralizedDiceCE(3, include_background=False)(x, torch.zeros(1, 2, 2, 2, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_absent_class_is_penalised_like_the_rarest_present_one():
    labels = torch.tensor([0, 0, 0, 1]).view(1, 1, 1, 4)
    confident = torch.tensor([[9.0, 9, 9, -9], [-9, -9, -9, 9], [-9, -9, -9, -9]]).view(1, 3, 1, 1, 4)
    leaking = confident.clone()
    leaking[0, 2, 0, 0, 0] = 9.0  # voxel 0 now splits between class 0 and the absent class 2
    loss = GeneralizedDiceCE(3, ce_weight=0.0)
    assert loss(leaking, labels) > loss(confident, labels) + 0.05


def test_bad_inputs_raise_one_line_errors():
    x = torch.randn(1, 3, 2, 2, 2)
    with pytest.raises(DataError, match=r"label values 0\.\.3 outside 0\.\.2"):
        GeneralizedDiceCE(3)(x, torch.tensor([0, 3] * 4).view(1, 2, 2, 2))
    with pytest.raises(ConfigError, match="num_classes=4"):
        DiceCE(4)(x, torch.zeros(1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_classes"):
        CrossEntropy(1)


def test_registered_names():
    assert {"gdice_ce", "dice_ce", "ce"} <= set(plugins.names("losses"))
    assert plugins.get("losses", "gdice_ce") is GeneralizedDiceCE


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
def test_matches_monai(include_background, batch):
    monai_losses = pytest.importorskip("monai.losses")
    logits, labels = sample(absent=(2,), seed=3)
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    common = dict(softmax=True, to_onehot_y=True, include_background=include_background, batch=batch)
    ce = torch.nn.functional.cross_entropy(x, y)
    gdl = monai_losses.GeneralizedDiceLoss(**common)(x, y[:, None]) + ce
    assert GeneralizedDiceCE(4, include_background=include_background, batch=batch)(x, y).item() == \
        pytest.approx(gdl.item(), rel=1e-5)
    dice_ce = monai_losses.DiceCELoss(**common)(x, y[:, None])
    assert DiceCE(4, include_background=include_background, batch=batch)(x, y).item() == \
        pytest.approx(dice_ce.item(), rel=1e-5)
