"""largest_component against hand-made cases, a brute-force flood fill and scipy.ndimage.label."""

import json
from collections import deque

import numpy as np
import pytest
import SimpleITK as sitk

from seg.core import plugins
from seg.core.errors import ConfigError
from seg.plugins.postprocess import LargestComponent

ndimage = pytest.importorskip("scipy.ndimage")


def flood_fill_largest(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component by breadth-first search in raster order (first of equals)."""
    seen = np.zeros(mask.shape, bool)
    best = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, component = deque([start]), []
        while queue:
            voxel = queue.popleft()
            component.append(voxel)
            for axis in range(3):
                for step in (-1, 1):
                    n = list(voxel)
                    n[axis] += step
                    n = tuple(n)
                    if all(0 <= c < s for c, s in zip(n, mask.shape)) and mask[n] and not seen[n]:
                        seen[n] = True
                        queue.append(n)
        if len(component) > len(best):
            best = component
    keep = np.zeros(mask.shape, bool)
    for voxel in best:
        keep[voxel] = True
    return keep


def scipy_largest(labels: np.ndarray, values) -> np.ndarray:
    expected = labels.copy()
    for value in values:
        components, count = ndimage.label(labels == value)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        expected[(labels == value) & (components != 1 + int(np.argmax(sizes)))] = 0
    return expected


def test_hand_made_case():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, 0, 0:3] = 1          # 3 voxels
    labels[2, 1:3, 1:4] = 1        # 6 voxels: kept
    labels[1, 0, 0] = 2            # these two 2s share only an edge: two components of 1 voxel each
    labels[0, 1, 0] = 2
    labels[1, 3, 3] = 3
    got = LargestComponent()(labels)
    expected = labels.copy()
    expected[0, 0, 0:3] = 0
    expected[1, 0, 0] = 0          # of equals, the one first in (z, y, x) order stays: (0, 1, 0)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint8 and labels[0, 0, 0] == 1  # the input is not modified


def test_flood_fill_agrees_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((5, 6, 7)) < 0.35
        labels = mask.astype(np.uint8) * 4
        got = LargestComponent()(labels)
        np.testing.assert_array_equal(got == 4, flood_fill_largest(mask))


def test_scipy_agrees_on_random_multilabel_arrays():
    rng = np.random.default_rng(1)
    for _ in range(10):
        labels = np.where(rng.random((8, 9, 10)) < 0.5, rng.integers(1, 5, (8, 9, 10)), 0).astype(np.uint8)
        np.testing.assert_array_equal(LargestComponent()(labels), scipy_largest(labels, [1, 2, 3, 4]))


def test_labels_option_limits_the_organs():
    rng = np.random.default_rng(2)
    labels = np.where(rng.random((6, 6, 6)) < 0.5, rng.integers(1, 4, (6, 6, 6)), 0).astype(np.uint8)
    got = LargestComponent(labels=[2, 9])(labels)
    np.testing.assert_array_equal(got, scipy_largest(labels, [2]))
    assert (got[labels != 2] == labels[labels != 2]).all()


def test_bad_labels_option():
    for bad in ([0], [256], "liver", [1.5], [True]):
        with pytest.raises(ConfigError, match="largest_component: labels"):
            LargestComponent(labels=bad)
    assert plugins.get("inferers", "largest_component") is LargestComponent


def test_real_pseudo_labels_agree_with_scipy(real_ct):
    mapping = json.loads((real_ct / "flare22_labels.json").read_text())["totalsegmentator_total_to_flare22"]
    total = sitk.GetArrayFromImage(sitk.ReadImage(str(real_ct / "example_seg_fast_force_split.nii.gz")))
    labels = np.zeros(total.shape, np.uint8)
    for source, organ in mapping.items():
        labels[total == int(source)] = organ
    got = LargestComponent()(labels)
    np.testing.assert_array_equal(got, scipy_largest(labels, range(1, 14)))
    assert (got > 0).sum() > 0.9 * (labels > 0).sum()
