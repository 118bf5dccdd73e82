"""DSC and NSD against independent computations (scipy, analytic geometry), FLARE22 rules, seg evaluate."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from seg.core.evaluate import evaluate_folders
from seg.core.metrics import FLARE22_TOLERANCES, dice, evaluate_case, normalized_surface_dice


def brute_nsd(pred, gt, spacing, tol):
    """Surface = mask minus its 6-connected erosion (scipy); distances by exact EDT with the spacing."""
    def surface(m):
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)
    sp, sg = surface(pred), surface(gt)
    dp = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    dg = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return ((dp <= tol).sum() + (dg <= tol).sum()) / (sp.sum() + sg.sum())


def ball(shape, center, radius, spacing=(1, 1, 1)):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= radius ** 2


def test_dice_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((6, 7, 8)) > 0.5, rng.random((6, 7, 8)) > 0.6
        inter = sum(1 for idx in np.ndindex(a.shape) if a[idx] and b[idx])
        assert dice(a, b) == pytest.approx(2 * inter / (a.sum() + b.sum()))
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing, tol", [((1, 1, 1), 1.0), ((2.5, 0.8, 0.8), 2.0), ((3, 1, 1), 0.0)])
def test_nsd_matches_scipy_reference_on_random_blobs(seed, spacing, tol):
    rng = np.random.default_rng(seed)
    pred = ndimage.gaussian_filter(rng.random((14, 16, 16)), 2) > 0.5
    gt = ndimage.gaussian_filter(rng.random((14, 16, 16)), 2) > 0.5
    if not pred.any() or not gt.any():
        pytest.skip("empty blob")
    assert normalized_surface_dice(pred, gt, spacing, tol) == pytest.approx(brute_nsd(pred, gt, spacing, tol))


def test_shifted_cube_with_anisotropic_spacing():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)  # 2 slices at 2.5 mm = 5 mm
    spacing = (2.5, 0.8, 0.8)
    assert normalized_surface_dice(a, b, spacing, 5.0) == 1.0
    # below 5 mm exactly one 10x10 end cap of each cube is out of reach (2 slices from the other's surface);
    # every other surface voxel has the other surface within one slice (2.5 mm) or 4 pixels (3.2 mm)
    value = normalized_surface_dice(a, b, spacing, 4.9)
    surf = np.count_nonzero(a & ~ndimage.binary_erosion(a))
    assert surf == 10 ** 3 - 8 ** 3
    assert value == pytest.approx((2 * surf - 2 * 100) / (2 * surf))
    assert normalized_surface_dice(a, b, spacing, 2.4) < value


def test_concentric_spheres():
    shape, c = (41, 41, 41), (20, 20, 20)
    inner, outer = ball(shape, c, 8), ball(shape, c, 11)
    assert normalized_surface_dice(inner, outer, (1, 1, 1), 3.6) == 1.0  # radii differ by 3 mm
    assert normalized_surface_dice(inner, outer, (1, 1, 1), 1.5) < 0.1


def test_flare_rules():
    labels, tol = {5: "aorta", 7: "rag", 9: "gal"}, FLARE22_TOLERANCES
    gt = np.zeros((10, 8, 8), np.uint8)
    gt[3:6, 2:5, 2:5] = 5
    pred = gt.copy()
    pred[8, 2:5, 2:5] = 5  # aorta false positive outside the ground truth's slices: ignored
    pred[1, 1, 1] = 9  # gallbladder only in the prediction: 0 and 0
    scores = evaluate_case(pred, gt, (2.5, 1, 1), labels, tol)
    assert scores[5] == (1.0, 1.0)
    assert scores[7] == (1.0, 1.0)  # absent from both
    assert scores[9] == (0.0, 0.0)


def test_evaluate_folders_writes_csv_and_json(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    gt = np.zeros((6, 10, 10), np.uint8)
    gt[1:4, 2:6, 2:6] = 1
    gt[1:3, 7:9, 7:9] = 2
    pred = gt.copy()
    pred[1:4, 2:6, 2] = 0
    for folder, arr in (("gt", gt), ("pred", pred)):
        for case in ("c1", "c2"):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(tmp_path / folder / f"{case}.nii.gz"))
    (tmp_path / "pred" / "c2.nii.gz").unlink()
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tolerances=1.0)
    expected_a = 2 * (pred == 1).sum() / ((pred == 1).sum() + (gt == 1).sum())
    means = report.mean_per_organ()
    assert means["a"]["dsc"] == pytest.approx(expected_a / 2)  # c2 is missing: 0
    assert means["b"]["dsc"] == pytest.approx(0.5)
    report.write_csv(tmp_path / "m.csv")
    report.write_json(tmp_path / "m.json")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "case,organ,label,dsc,nsd,note" and len(lines) == 5 and "missing prediction" in lines[-1]
    assert json.loads((tmp_path / "m.json").read_text())["mean"]["dsc"] == pytest.approx(report.overall()["dsc"])
