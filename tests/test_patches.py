"""Patch sampling and fine-tuning augmentations, checked against brute-force expectations."""

import numpy as np

from seg.core.patches import LabeledPatches, class_voxels, foreground_slices, sample_patch


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


class _Case:
    def __init__(self, image, label):
        self.image, self.label = image, label


def _organs():
    """One case: a large organ (class 1, 600 voxels), a small one (class 2, 4 voxels), class 3 absent."""
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:8, 2:12, 2:12] = 1
    label[15:17, 15:17, 15] = 2
    return _Case(np.zeros(label.shape, np.float32), label)


def test_class_voxels_brute_force():
    label = np.random.default_rng(5).integers(0, 4, (5, 6, 7)).astype(np.uint8)
    label[label == 2] = 0
    got = class_voxels(label)
    assert sorted(got) == [1, 3]
    for value, flat in got.items():
        assert sorted(flat.tolist()) == np.flatnonzero(label == value).tolist()


def test_class_aware_rule_draws_present_classes_uniformly():
    """nnU-Net's rule: with class_share 1 every centre lies in a class drawn uniformly among those present."""
    case = _organs()
    patches = LabeledPatches([case], (4, 4, 4), 1.0, np.random.default_rng(6))
    counts = {1: 0, 2: 0}
    for _ in range(2000):
        voxel, chosen = patches.centre(0)
        assert case.label[voxel] == chosen
        counts[chosen] += 1
    assert abs(counts[2] / 2000 - 0.5) < 0.04  # 3 sd of a fair coin over 2000 draws is 0.034


def test_class_share_mixes_the_two_rules():
    """With class_share 0.3 about 30 % of the patches follow the class rule. Under the paper's rule the small
    organ is centred as often as a foreground slice holding it is drawn (2 of the 8 foreground slices)."""
    case = _organs()
    patches = LabeledPatches([case], (4, 4, 4), 0.3, np.random.default_rng(7))
    ruled = [patches.centre(0)[1] is not None for _ in range(3000)]
    assert abs(np.mean(ruled) - 0.3) < 0.03
    plain = LabeledPatches([case], (4, 4, 4), 0.0, np.random.default_rng(8))
    small = [(plain.batch(1)[1] == 2).any() for _ in range(1000)]
    assert abs(np.mean(small) - 2 / 8) < 0.05


def test_labeled_batches_contain_their_centre_class():
    case = _organs()
    patches = LabeledPatches([case], (4, 4, 4), 1.0, np.random.default_rng(9))
    images, labels = patches.batch(64)
    assert images.shape == (64, 1, 4, 4, 4) and images.dtype == np.float32 and labels.dtype == np.int64
    assert 15 < sum((lab == 2).any() for lab in labels) < 50
