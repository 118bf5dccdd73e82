"""Patch sampling and fine-tuning augmentations, checked against brute-force expectations."""

import numpy as np

from seg.core.config import Augment
from seg.core.patches import augment, foreground_slices, sample_patch


def test_foreground_slices_brute_force():
    label = np.zeros((6, 4, 4), np.uint8)
    label[1, 2, 3] = 1
    label[4, 0, 0] = 5
    assert foreground_slices(label).tolist() == [z for z in range(6) if label[z].any()]


def test_every_patch_holds_foreground_and_is_a_true_crop():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 8, 8)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[33, 3, 4] = 2  # a single foreground voxel near the end
    fg = foreground_slices(label)
    starts = set()
    for _ in range(200):
        img, lab = sample_patch(image, label, (10, 8, 8), rng, fg)
        assert img.shape == (10, 8, 8) and lab.shape == (10, 8, 8)
        assert (lab == 2).sum() == 1
        z0 = [z for z in range(31) if np.array_equal(image[z:z + 10], img)]
        assert len(z0) == 1 and np.array_equal(label[z0[0]:z0[0] + 10], lab)
        starts.add(z0[0])
    assert starts == set(range(24, 31))  # every start whose window contains slice 33, and only those


def test_small_volumes_are_padded_with_air_and_background():
    rng = np.random.default_rng(1)
    image = np.full((3, 4, 4), 2.0, np.float32)
    image[0, 0, 0] = -1.5
    label = np.ones((3, 4, 4), np.uint8)
    img, lab = sample_patch(image, label, (8, 4, 4), rng, foreground_slices(label))
    assert img.shape == (8, 4, 4)
    assert np.all(img[3:] == -1.5) and np.all(lab[3:] == 0)


def test_unlabeled_patches_are_uniform_crops():
    rng = np.random.default_rng(2)
    image = np.arange(20 * 4 * 4, dtype=np.float32).reshape(20, 4, 4)
    firsts = {int(sample_patch(image, None, (5, 4, 4), rng)[0][0, 0, 0]) // 16 for _ in range(300)}
    assert firsts == set(range(16))


def test_augment_flips_image_and_label_together():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 5, 6)).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    img, lab = augment(image, label, Augment(flip_prob=1.0), rng)
    assert np.array_equal(img, image[::-1, ::-1, ::-1]) and np.array_equal(lab, label[::-1, ::-1, ::-1])
    img, lab = augment(image, label, Augment(), rng)
    assert np.array_equal(img, image) and np.array_equal(lab, label)


def test_intensity_augment_is_an_affine_map():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(3, 3, 3)).astype(np.float32)
    img, _ = augment(image, None, Augment(intensity_scale=0.2, intensity_shift=0.5), rng)
    slope, intercept = np.polyfit(image.ravel(), img.ravel(), 1)
    assert 0.8 <= slope <= 1.2 and -0.5 <= intercept <= 0.5
    assert np.allclose(img, slope * image + intercept, atol=1e-5)
