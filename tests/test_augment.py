"""Fine-tuning augmentations against independent computations (scipy.ndimage, numpy, torch.rot90) and for
image/label alignment; every draw reproducible from its seed."""

import math

import numpy as np
import pytest
import torch

from seg.core.augment import (adjust_gamma, augment_batch, elastic_displacement, gaussian_blur, rotation_matrix,
                              sampling_grid, warp)
from seg.core.config import Augment

ndimage = pytest.importorskip("scipy.ndimage")


def _sample(seed=0, shape=(6, 10, 12)):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1, *shape), generator=g)
    label = torch.randint(0, 4, shape, generator=g)
    return image, label


def _interior(matrix: np.ndarray, offset: np.ndarray, shape) -> np.ndarray:
    """Output voxels whose source point lies inside the input by a voxel: padding conventions play no role."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1).astype(float)
    src = matrix @ idx + offset[:, None]
    inside = np.all((src >= 1) & (src <= np.array(shape)[:, None] - 2), axis=0)
    return inside.reshape(shape)


def test_no_augmentation_is_the_identity_bit_for_bit():
    image, label = _sample()
    images, labels = augment_batch(image[None], label[None], Augment(), seed=3)
    assert torch.equal(images[0], image) and torch.equal(labels[0], label)


def test_quarter_turn_in_plane_is_rot90():
    image, label = _sample(shape=(4, 8, 8))
    moved, labels = warp(image, label, sampling_grid(label.shape, rotation_matrix([math.pi / 2, 0, 0])))
    torch.testing.assert_close(moved, torch.rot90(image, -1, dims=(2, 3)), atol=1e-5, rtol=0)
    assert torch.equal(labels, torch.rot90(label, -1, dims=(1, 2)))


@pytest.mark.parametrize("angles,zoom", [((0.3, 0, 0), 1.0), ((0.2, -0.1, 0.15), 1.2), ((0, 0, 0), 0.85)])
def test_rotation_and_zoom_match_scipy_affine_transform(angles, zoom):
    """The output at voxel v reads the input at c + M (v - c), M = R / zoom: scipy's affine_transform with
    order 1 (image) and order 0 (labels) computes the same, compared where the source is well inside."""
    image, label = _sample(1, (9, 11, 10))
    matrix = rotation_matrix(angles) / zoom
    moved, labels = warp(image, label, sampling_grid(label.shape, matrix))
    m = matrix.numpy()
    centre = (np.array(label.shape) - 1) / 2
    offset = centre - m @ centre
    expected = ndimage.affine_transform(image[0].double().numpy(), m, offset, order=1)
    inside = _interior(m, offset, label.shape)
    assert inside.sum() > 100
    np.testing.assert_allclose(moved[0].numpy()[inside], expected[inside], atol=1e-4)
    nearest = ndimage.affine_transform(label.numpy(), m, offset, order=0)
    src = (m @ np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij")).reshape(3, -1)
           + offset[:, None]).reshape(3, *label.shape)
    tie = np.any(np.abs(src - np.floor(src) - 0.5) < 1e-3, axis=0)  # rounding conventions may differ at .5
    assert np.array_equal(labels.numpy()[inside & ~tie], nearest[inside & ~tie])


def test_elastic_warp_matches_scipy_map_coordinates():
    image, label = _sample(2, (8, 12, 12))
    displacement = elastic_displacement(label.shape, 1.5, 4.0, torch.Generator().manual_seed(0))
    moved, labels = warp(image, label, sampling_grid(label.shape, torch.eye(3, dtype=torch.float64), displacement))
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij")) + displacement.numpy()
    expected = ndimage.map_coordinates(image[0].double().numpy(), coords, order=1)
    inside = np.all((coords >= 1) & (coords <= np.array(label.shape).reshape(3, 1, 1, 1) - 2), axis=0)
    assert inside.sum() > 200 and displacement.abs().max() > 0.5
    np.testing.assert_allclose(moved[0].numpy()[inside], expected[inside], atol=1e-4)


def test_elastic_field_is_smooth_and_scaled_by_alpha():
    field = elastic_displacement((16, 32, 32), 2.0, 8.0, torch.Generator().manual_seed(1))
    assert field.shape == (3, 16, 32, 32)
    assert 1.0 < field.std() < 3.0  # the lattice is N(0, 2); interpolation between knots lowers it somewhat
    assert field.diff(dim=3).std() < 0.3 * field.std()  # smooth: neighbours differ far less than the field varies


def test_labels_stay_aligned_with_the_image():
    """A binary image equal to its label map, through a random rotation + zoom + elastic warp: wherever the
    interpolated image is exactly 0 or 1 (its source neighbourhood is uniform) the label says the same."""
    label = torch.zeros(12, 24, 24, dtype=torch.int64)
    label[3:9, 5:15, 8:20] = 1
    label[5:7, 16:22, 2:6] = 1
    cfg = Augment(rotation=[20.0, 10.0, 10.0], scale=[0.8, 1.2], spatial_prob=1.0, elastic_alpha=2.0,
                  elastic_prob=1.0)
    for seed in range(5):
        images, labels = augment_batch(label[None, None].float(), label[None], cfg, seed)
        image, moved = images[0, 0], labels[0]
        uniform = (image == 0) | (image == 1)
        assert uniform.float().mean() > 0.5
        assert torch.equal(moved[uniform], image[uniform].long())
        assert not torch.equal(moved, label)


def test_flip_every_axis():
    image, label = _sample(3)
    images, labels = augment_batch(image[None], label[None], Augment(flip_prob=1.0), seed=0)
    assert np.array_equal(images[0, 0].numpy(), image[0].numpy()[::-1, ::-1, ::-1])
    assert np.array_equal(labels[0].numpy(), label.numpy()[::-1, ::-1, ::-1])


def test_gamma_is_nnunets_formula():
    image = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    x = image.numpy()
    lo, span = x.min(), x.max() - x.min()
    expected = ((x - lo) / span) ** 1.4 * span + lo
    expected = (expected - expected.mean()) / expected.std(ddof=1) * x.std(ddof=1) + x.mean()
    np.testing.assert_allclose(adjust_gamma(image, 1.4).numpy(), expected, atol=1e-10)


def test_blur_matches_scipy():
    image = torch.randn(1, 1, 7, 9, 11, dtype=torch.float64)
    got = gaussian_blur(image, torch.tensor([[0.8, 0.8, 0.8]], dtype=torch.float64))
    np.testing.assert_allclose(got[0, 0].numpy(), ndimage.gaussian_filter(image[0, 0].numpy(), 0.8, mode="mirror"),
                               atol=1e-10)


def test_intensity_scale_and_shift_are_an_affine_map_and_noise_has_its_std():
    image = torch.randn(1, 1, 8, 16, 16)
    label = torch.zeros(1, 8, 16, 16, dtype=torch.int64)
    out, _ = augment_batch(image, label, Augment(intensity_scale=0.2, intensity_shift=0.5), seed=1)
    slope, intercept = np.polyfit(image.numpy().ravel(), out.numpy().ravel(), 1)
    assert 0.8 <= slope <= 1.2 and -0.5 <= intercept <= 0.5 and abs(slope - 1) + abs(intercept) > 1e-3
    np.testing.assert_allclose(out.numpy(), slope * image.numpy() + intercept, atol=1e-5)
    noisy, _ = augment_batch(image, label, Augment(noise_std=0.3), seed=2)
    assert abs(float((noisy - image).std()) - 0.3) < 0.02


def test_draws_are_reproducible_from_the_seed_and_differ_between_seeds():
    image, label = _sample(4, (8, 16, 16))
    cfg = Augment(rotation=[15.0, 0, 0], scale=[0.9, 1.1], spatial_prob=1.0, gamma_prob=1.0, blur_prob=1.0,
                  noise_std=0.1, flip_prob=0.5, elastic_alpha=1.0, elastic_prob=1.0)
    batch = (image.repeat(3, 1, 1, 1, 1), label.repeat(3, 1, 1, 1))
    first, again, other = (augment_batch(*batch, cfg, seed) for seed in (5, 5, 6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0][0], first[0][1])  # each sample its own draw
