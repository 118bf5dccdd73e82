"""The PCRL / MoCo augmentations and corruptions, each against an independent computation."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from seg.core.errors import ConfigError, DataError
from seg.plugins import ssl_transforms as T



def gen(seed=0):
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def box_mask(shape, box):
    """A boolean array of ``shape``, true inside ``box``."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + n) for s, n in box)] = True
    return mask


def test_box_iou_matches_voxel_count():
    g = gen(1)
    for _ in range(50):
        a, b = (tuple((T.randint(0, 5, g), T.randint(1, 6, g)) for _ in range(3)) for _ in range(2))
        ma, mb = box_mask((12, 12, 12), a), box_mask((12, 12, 12), b)
        assert T.box_iou(a, b) == pytest.approx((ma & mb).sum() / (ma | mb).sum())


def test_box_pairs_overlap_and_fit_in_patch():
    g = gen(2)
    sizes = set()
    for _ in range(100):
        a, b = T.sample_box_pair((20, 40, 40), (8, 16, 16), generator=g)
        assert T.box_iou(a, b) > 0.25
        for box in (a, b):
            assert all(0 <= s and s + n <= extent for (s, n), extent in zip(box, (20, 40, 40)))
            sizes.add(tuple(n for _, n in box))
    # official scales x (8, 16, 16), clipped to the patch
    assert sizes <= {(8, 16, 16), (12, 24, 24), (20, 24, 24), (4, 8, 8), (16, 28, 28)}
    assert len(sizes) >= 3


def test_crop_resize_is_an_exact_crop_or_trilinear_resample():
    volume = torch.arange(2 * 6 * 7 * 8, dtype=torch.float32).reshape(2, 6, 7, 8)
    box = ((1, 3), (2, 4), (0, 5))
    assert torch.equal(T.crop_resize(volume, box, (3, 4, 5)), volume[:, 1:4, 2:6, 0:5])
    # a linear ramp along each axis resamples to the ramp at the pixel-centre coordinates (clamped at edges)
    for axis in range(3):
        coords = torch.arange(20, dtype=torch.float32)
        ramp = coords.reshape([-1 if a == axis else 1 for a in range(3)]).expand(20, 20, 20)[None]
        start, length, out = 3, 10, 4
        box = tuple((start, length) if a == axis else (0, 20) for a in range(3))
        size = tuple(out if a == axis else 20 for a in range(3))
        got = T.crop_resize(ramp, box, size)
        source = ((np.arange(out) + 0.5) * length / out - 0.5).clip(0, length - 1) + start
        expect = torch.tensor(source, dtype=torch.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        torch.testing.assert_close(got[0], expect.expand(size), rtol=0, atol=1e-5)


def test_paired_views_are_the_sampled_crops():
    batch = torch.randn(3, 1, 12, 20, 20)
    g = gen(3)
    first, second = T.paired_views(batch, (8, 8, 8), scales=((1, 1, 1),), generator=g)
    assert first.shape == second.shape == (3, 1, 8, 8, 8)
    replay = gen(3)
    for i in range(3):
        a, b = T.sample_box_pair((12, 20, 20), (8, 8, 8), ((1, 1, 1),), generator=replay)
        assert torch.equal(first[i], batch[i][(slice(None), *(slice(s, s + n) for s, n in a))])
        assert torch.equal(second[i], batch[i][(slice(None), *(slice(s, s + n) for s, n in b))])
    small, _ = T.paired_views(torch.randn(2, 1, 4, 20, 20), (8, 8, 8), generator=g)
    assert small.shape == (2, 1, 4, 8, 8)  # the crop takes the patch's size where the patch is smaller


@pytest.mark.parametrize("sigmas", [[(0.7, 1.3, 0.0), (2.0, 0.4, 1.0)], [(0.0, 0.0, 0.0), (1.5, 1.5, 1.5)]])
def test_gaussian_blur_matches_scipy(sigmas):
    x = torch.randn(2, 1, 14, 15, 16, dtype=torch.float64)
    got = T.gaussian_blur(x, torch.tensor(sigmas, dtype=torch.float64))
    for i, sigma in enumerate(sigmas):
        expect = ndimage.gaussian_filter(x[i, 0].numpy(), sigma, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(got[i, 0].numpy(), expect, rtol=0, atol=1e-12)


def test_gaussian_kernel_values_by_hand():
    kernel = T.gaussian_kernels(torch.tensor([0.5], dtype=torch.float64))[0]
    # radius int(4 * 0.5 + 0.5) = 2; weights exp(-x^2 / (2 * 0.25)) = exp(-2 x^2)
    w = np.exp(-2.0 * np.arange(-2, 3) ** 2)
    np.testing.assert_allclose(kernel.numpy(), w / w.sum(), rtol=1e-14)


@pytest.mark.parametrize("paint", [T.inpaint, T.outpaint])
def test_painting_changes_exactly_the_masked_voxels(paint):
    x = torch.full((1, 16, 18, 20), 5.0)
    seen = 0
    for seed in range(20):
        out, mask = paint(x, 0.0, 1.0, gen(seed))
        assert out.shape == x.shape and mask.shape == x.shape[1:]
        changed = out[0] != 5.0
        assert torch.equal(changed, mask)
        assert torch.equal(out[0][~mask], x[0][~mask])
        assert bool(((out[0][mask] >= 0) & (out[0][mask] <= 1)).all())
        seen += int(mask.any())
    assert seen >= 15
    assert torch.equal(x, torch.full((1, 16, 18, 20), 5.0))  # input untouched


def test_inpaint_boxes_and_outpaint_kept_box_sizes():
    x = torch.full((1, 30, 30, 30), 5.0)
    for seed in range(10):
        _, mask = T.inpaint(x, 0.0, 1.0, gen(seed))
        assert mask.float().mean() <= 5 * (10 / 30) ** 3 + 1e-6  # at most 5 boxes of at most 1/3 per side
        _, mask = T.outpaint(x, 0.0, 1.0, gen(seed))
        kept = (~mask).float().mean()
        assert (30 - 4 * 30 // 7) ** 3 / 30 ** 3 - 1e-6 <= kept  # the first kept box is at least this big


def test_corrupt_pair_identity_and_blur_only():
    a, b = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    ca, cb = T.corrupt_pair(a, b, blur_rate=0.0, blur_sigma=(0.0, 2.0), paint_rate=0.0, inpaint_rate=0.2)
    assert torch.equal(ca, a) and torch.equal(cb, b) and ca is not a
    g, replay = gen(5), gen(5)
    ca, cb = T.corrupt_pair(a, b, blur_rate=1.0, blur_sigma=(0.5, 1.5), paint_rate=0.0, inpaint_rate=0.2, generator=g)
    for view, got in ((a, ca), (b, cb)):
        sigmas = 0.5 + torch.rand(2, 3, generator=replay)
        torch.rand(2, generator=replay)
        torch.testing.assert_close(got, T.gaussian_blur(view, sigmas))


def test_flip_rotate_matches_numpy_and_inverts():
    x = torch.randn(1, 4, 5, 5)
    for flips in [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)]:
        for k in range(4):
            got = T.flip_rotate(x, flips, k)
            ref = x.numpy()
            for axis in range(3):
                if flips[axis]:
                    ref = np.flip(ref, axis=1 + axis)
            ref = np.rot90(ref, k, axes=(2, 3))
            np.testing.assert_array_equal(got.numpy(), ref)
            assert torch.equal(T.unflip_rotate(got, flips, k), x)


def test_quarter_turn_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)  # (D, H, W) with H rows, W columns
    assert T.flip_rotate(x, (0, 0, 0), 1)[0, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert T.flip_rotate(x, (0, 0, 1), 0)[0, 0].tolist() == [[2.0, 1.0], [4.0, 3.0]]
    assert T.transform_code((1, 0, 1), 2) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_random_flip_rotate_codes_describe_the_transform():
    x = torch.randn(6, 1, 4, 6, 6)
    out, codes = T.random_flip_rotate(x, generator=gen(7))
    assert codes.shape == (6, 7) and bool((codes[:, 3:].sum(1) == 1).all())
    for i in range(6):
        flips, k = codes[i, :3].bool().tolist(), int(codes[i, 3:].argmax())
        assert torch.equal(T.unflip_rotate(out[i], flips, k), x[i])
    _, codes = T.random_flip_rotate(torch.randn(40, 1, 4, 6, 8), generator=gen(8))
    assert set(codes[:, 3:].argmax(1).tolist()) == {0, 2}  # half turns only when H != W


def test_mixup_is_the_claimed_convex_combination():
    x = torch.randn(4, 1, 3, 3, 3)
    order = torch.tensor([2, 0, 3, 1])
    got = T.batch_mixup(x, 0.7, order)
    for i in range(4):
        torch.testing.assert_close(got[i], 0.7 * x[i] + 0.3 * x[int(order[i])])
    a, b = [torch.ones(2), torch.zeros(3)], [torch.zeros(2), torch.ones(3)]
    assert [t.tolist() for t in T.mix(a, b, 0.25)] == [[0.25, 0.25], [0.75, 0.75, 0.75]]
    lams = [T.sample_mixup_lambda(1.0, gen(s)) for s in range(50)] + [T.sample_mixup_lambda(0.5) for _ in range(20)]
    assert all(0.5 <= lam <= 1.0 for lam in lams) and len(set(lams)) > 40


@pytest.mark.parametrize("option, value", [("crop_size", (8, 8)), ("crop_size", (8, 0, 8)), ("flip_rate", 1.5),
                                           ("blur_sigma", (2.0, 1.0)), ("crop_scales", []), ("paint_rate", "x")])
def test_bad_augmentation_options_name_the_option(option, value):
    options = {f.name: f.default for f in T.attrs.fields(T.Augmentation)} | {option: value}
    with pytest.raises(ConfigError, match=option):
        T.Augmentation.checked("pcrl", **options)


def test_toml_lists_are_accepted():
    options = {f.name: f.default for f in T.attrs.fields(T.Augmentation)}
    aug = T.Augmentation.checked("pcrl", **options | {"crop_size": [16, 32, 32], "blur_sigma": [0, 1]})
    assert aug.crop_size == (16, 32, 32) and aug.blur_sigma == (0.0, 1.0)


def test_batch_shape_is_checked():
    with pytest.raises(DataError, match="pcrl"):
        T.check_batch("pcrl", torch.zeros(2, 3, 4, 4, 4))


def smooth(shape=(10, 12, 14), seed=0) -> torch.Tensor:
    """A (1, *shape) smooth random volume."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32))[None]


def test_view_affine_matches_scipy_affine_transform():
    x = smooth()
    angles, zooms = (0.12, -0.15, 0.08), (0.9, 1.1, 1.05)
    got = T.view_affine(x, False, angles, zooms)[0].numpy()
    matrix = T.rotation_matrix(angles).numpy() @ np.diag(1 / np.array(zooms))
    centre = (np.array(x.shape[1:]) - 1) / 2  # the output at v reads the input at c + M (v - c)
    expect = ndimage.affine_transform(x[0].numpy().astype(np.float64), matrix, offset=centre - matrix @ centre,
                                      order=1, mode="grid-constant", cval=float(x.min()))
    np.testing.assert_allclose(got, expect, atol=2e-5)
    flipped = T.view_affine(x, True, angles, zooms)[0].numpy()  # the flip comes first, then the affine
    expect = ndimage.affine_transform(x[0].numpy()[:, :, ::-1].astype(np.float64), matrix,
                                      offset=centre - matrix @ centre, order=1, mode="grid-constant", cval=float(x.min()))
    np.testing.assert_allclose(flipped, expect, atol=2e-5)


def test_view_affine_without_a_transform_is_exact():
    x = smooth()
    assert torch.equal(T.view_affine(x, True, (0, 0, 0), (1, 1, 1)), x.flip(-1))
    assert torch.equal(T.view_affine(x, False, (0, 0, 0), (1, 1, 1)), x)
    batch = torch.stack([x, 2 * x])
    assert torch.equal(T.random_view_affine(batch, 0.0, 0.0, (1.0, 1.0), gen()), batch)


def test_random_view_affine_draws_the_official_ranges_per_sample(monkeypatch):
    draws = []
    monkeypatch.setattr(T, "view_affine", lambda x, flip, angles, zooms: draws.append((flip, angles, zooms)) or x)
    T.random_view_affine(torch.zeros(2000, 1, 2, 2, 2), generator=gen())
    flips = np.array([d[0] for d in draws])
    angles = np.degrees([d[1] for d in draws])
    zooms = np.array([d[2] for d in draws])
    assert 0.45 < flips.mean() < 0.55
    assert np.abs(angles).max() <= 10 and (np.abs(angles) > 9.5).any(axis=0).all()  # every axis spans +-10 degrees
    assert zooms.min() >= 0.9 and zooms.max() <= 1.1 and (zooms < 0.91).any(axis=0).all() and (zooms > 1.09).any(axis=0).all()
    assert abs(np.corrcoef(angles[:, 0], angles[:, 1])[0, 1]) < 0.1  # axes drawn independently
    assert abs(np.corrcoef(zooms[:, 0], zooms[:, 2])[0, 1]) < 0.1


def test_the_two_views_are_augmented_independently():
    x = smooth()[None].repeat(3, 1, 1, 1, 1)
    first, second = T.Augmentation().augment_views(x, x.clone(), gen())
    for a, b in zip(first, second):
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("option, value", [("view_rotation", -1.0), ("view_rotation", "x"), ("view_scale", (1.1, 0.9)),
                                           ("view_scale", (0.0, 1.0)), ("view_flip_rate", 2.0)])
def test_bad_view_options_name_the_option(option, value):
    with pytest.raises(ConfigError, match=option):
        T.Augmentation.checked("contrastive", **{option: value})
