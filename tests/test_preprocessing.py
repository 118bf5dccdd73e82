"""The paper's preprocessing and its inverse: real CT round trips, synthetic orientations, numerical pieces.

Every numerical piece is checked against an independent computation: scipy.ndimage, SimpleITK's own B-spline
resampler, an analytic ramp, numpy statistics, brute-force loops, and SimpleITK's physical-point transforms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from seg.core.errors import ConfigError, DataError, UnknownPluginError
from seg.core.io import Geometry, read_image
from seg.core.preprocessing import (Preprocessor, Sample, build_pipeline, from_array, invert_labels, run_pipeline,
                                    to_array)
from seg.plugins.preprocess import ClipZScore, CropBody, Reorient, Resample, permute_flip
from seg.plugins.resampling import apply_separable, bspline_matrix, linear_matrix, vote

ndimage = pytest.importorskip("scipy.ndimage")

PAPER = [("reorient", {}), ("crop_body", {}), ("resample", {"in_plane": [160, 160], "z_spacing": 2.5}),
         ("clip_zscore", {"low": -320.0, "high": 320.0})]
SMALL = [("reorient", {}), ("crop_body", {"margin_mm": 2.0}), ("resample", {"in_plane": [40, 36], "z_spacing": 2.0}),
         ("clip_zscore", {})]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def round_trip(image: sitk.Image, label: sitk.Image, steps) -> tuple[Sample, sitk.Image]:
    """Preprocess image + label, then invert the preprocessed label; the inverse must land on the input grid."""
    pipeline = build_pipeline(steps)
    sample, records = run_pipeline(pipeline, Sample(image, label))
    json.dumps(records)  # records are JSON-serialisable
    back = invert_labels(pipeline, sample.label, records)
    assert Geometry.of(back) == Geometry.of(image)  # identical, not merely close
    assert back.GetPixelID() == sitk.sitkUInt8
    return sample, back


def organ_dice(label: sitk.Image, back: sitk.Image, min_voxels: int) -> dict[int, float]:
    a, b = sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(back)
    return {int(v): dice(a == v, b == v) for v in np.unique(a) if v and (a == v).sum() > min_voxels}


# -- real CT -------------------------------------------------------------------------------------------------


def test_real_ct_round_trip_keeps_every_organ(real_ct):
    image = read_image(real_ct / "example_ct.nii.gz")
    totalseg = sitk.ReadImage(str(real_ct / "example_seg_fast_force_split.nii.gz"))
    mapping = json.loads((real_ct / "flare22_labels.json").read_text())["totalsegmentator_total_to_flare22"]
    lookup = np.zeros(256, np.uint8)
    for total, flare in mapping.items():
        lookup[int(total)] = flare
    label = from_array(lookup[sitk.GetArrayViewFromImage(totalseg)], totalseg)
    sample, back = round_trip(image, label, PAPER)
    assert sample.image.GetSize()[:2] == (160, 160)
    assert sample.image.GetSpacing()[2] == pytest.approx(2.5)
    scores = organ_dice(label, back, 1000)
    assert len(scores) >= 9  # liver, kidneys, spleen, aorta, IVC, gallbladder, stomach, duodenum
    assert min(scores.values()) >= 0.95, scores
    # RAS on disk: reorient flips x and y, so the preprocessed label is not the original array resized
    assert np.allclose(np.asarray(sample.image.GetDirection()).reshape(3, 3), np.eye(3))


def test_real_lps_ct_with_aorta(real_ct):
    image = read_image(real_ct / "more" / "lps_ct_cropped.nii.gz")
    label = read_image(real_ct / "more" / "lps_aorta.nii.gz", sitk.sitkUInt8)
    _, back = round_trip(image, label, PAPER)
    assert organ_dice(label, back, 1000)[1] >= 0.95


def test_real_dicom_series_geometry(real_ct):
    image = read_image(real_ct / "example_ct_dicom")
    body = sitk.Cast(sitk.BinaryThreshold(image, -500.0, 1e6, 1, 0), sitk.sitkUInt8)
    sample, back = round_trip(image, body, PAPER)
    assert sample.image.GetSize() == (160, 160, round(20 * 2.0 / 2.5))
    assert organ_dice(body, back, 1000)[1] >= 0.95


# -- synthetic orientations ------------------------------------------------------------------------------------


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),  # sagittal-like: x to P, y to I, z to R
    "oblique": rotation(0, 17) @ np.diag([1.0, -1.0, 1.0]),  # gantry tilt, flipped rows
    "oblique-permuted": rotation(2, 25) @ rotation(0, -12) @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float),
}
BLOBS = [((-10.0, 4.0, 2.0), 10.0, 1), ((11.0, -6.0, 6.0), 9.0, 2), ((2.0, 9.0, -12.0), 8.0, 3)]


def synthetic(direction: np.ndarray, size=(56, 52, 44), spacing=(1.0, 1.1, 1.3)) -> tuple[sitk.Image, sitk.Image]:
    """A CT-like image centred on the physical origin: air, an ellipsoid body, and labelled spherical blobs."""
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))
    image.SetOrigin((-centre).tolist())
    points = physical_points(image)
    hu = np.where(((points / [26.0, 22.0, 26.0]) ** 2).sum(-1) < 1, 40.0, -1000.0)
    label = np.zeros(points.shape[:3], np.uint8)
    for position, radius, value in BLOBS:
        inside = ((points - position) ** 2).sum(-1) < radius**2
        hu[inside], label[inside] = 40.0 + 60 * value, value
    hu_image = from_array(hu.astype(np.int16), image)
    return hu_image, from_array(label, image)


def physical_points(image: sitk.Image) -> np.ndarray:
    """Physical position (x, y, z mm) of every voxel, shape (z, y, x, 3), from the image geometry."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in image.GetSize()[::-1]), indexing="ij")[::-1], -1)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return index * image.GetSpacing() @ direction.T + image.GetOrigin()


@pytest.mark.parametrize("name", DIRECTIONS)
def test_synthetic_orientations_round_trip_and_keep_positions(name):
    image, label = synthetic(DIRECTIONS[name])
    sample, back = round_trip(image, label, SMALL)
    # shrunk about 1.5x and back, a blob of ~1500 voxels loses part of a voxel layer; linear one-hot
    # interpolation keeps Dice >= 0.945 here, where nearest-neighbour both ways gives 0.92
    assert min(organ_dice(label, back, 0).values()) >= 0.94
    direction = np.asarray(sample.image.GetDirection()).reshape(3, 3)
    assert np.all(np.argmax(np.abs(direction), axis=0) == [0, 1, 2]) and np.all(np.diag(direction) > 0)
    points = physical_points(sample.label)
    labels = sitk.GetArrayViewFromImage(sample.label)
    for position, radius, value in BLOBS:  # each blob is where it was, in millimetres
        centroid = points[labels == value].mean(axis=0)
        assert np.linalg.norm(centroid - position) < 1.0, (value, centroid, position)


@pytest.mark.parametrize("name", ["ras", "permuted", "oblique-permuted"])
def test_crop_and_resample_commute_with_reorient(name):
    """So ``crop_body, resample, reorient`` gives the paper's order's result with the flips on the small grid."""
    image, label = synthetic(DIRECTIONS[name])
    crop, resample = ("crop_body", {"margin_mm": 1.0}), ("resample", {"in_plane": [20, 24], "z_spacing": 2.0})
    pipeline = build_pipeline([crop, resample, ("reorient", {})])
    first, _ = run_pipeline(build_pipeline([("reorient", {}), crop, resample]), Sample(image, label))
    second, records = run_pipeline(pipeline, Sample(image, label))
    assert records[0]["record"] != {"lower": [0, 0, 0], "upper": [0, 0, 0]}  # the crop did crop
    assert Geometry.of(invert_labels(pipeline, second.label, records)) == Geometry.of(image)
    assert Geometry.of(first.image).matches(Geometry.of(second.image), tol=1e-9)
    assert first.image.GetSize()[:2] == (20, 24)
    assert np.allclose(to_array(first.image), to_array(second.image), atol=1e-3)
    assert np.array_equal(sitk.GetArrayViewFromImage(first.label), sitk.GetArrayViewFromImage(second.label))


def test_oblique_scan_keeps_its_tilt_and_physical_voxels():
    image, _ = synthetic(DIRECTIONS["oblique-permuted"])
    out, _ = Reorient()(Sample(image))
    assert np.allclose(np.asarray(out.image.GetDirection()).reshape(3, 3),
                       np.asarray(image.GetDirection()).reshape(3, 3)[:, [1, 0, 2]])
    assert sorted(out.image.GetSize()) == sorted(image.GetSize())


# -- numerical pieces --------------------------------------------------------------------------------------------


def test_reorient_keeps_each_voxels_physical_point():
    rng = np.random.default_rng(0)
    for name, direction in DIRECTIONS.items():
        image = from_array(rng.integers(-1000, 1000, (7, 6, 5)).astype(np.int16), Geometry(
            (5, 6, 7), (1.1, 1.7, 2.3), (10.0, -20.0, 30.0), tuple(direction.ravel())))
        out, record = Reorient()(Sample(image))
        for index in np.ndindex(*image.GetSize()):
            point = image.TransformIndexToPhysicalPoint(index)
            moved = out.image.TransformPhysicalPointToIndex(point)
            assert np.allclose(out.image.TransformIndexToPhysicalPoint(moved), point, atol=1e-6), name
            assert out.image[moved] == image[index], name
        back = Reorient().invert_label(sitk.Cast(out.image, sitk.sitkUInt8), record)
        assert Geometry.of(back).matches(Geometry.of(image), tol=1e-9)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LAS", "PIR"])
@pytest.mark.parametrize("name", ["lps", "ras", "permuted"])
def test_reorient_agrees_with_dicom_orient(name, orientation):
    image, _ = synthetic(DIRECTIONS[name], size=(9, 8, 7))
    ours = Reorient(orientation)(Sample(image))[0].image
    theirs = sitk.DICOMOrient(image, orientation)
    assert Geometry.of(ours).matches(Geometry.of(theirs), tol=1e-9)
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(theirs))


def test_crop_box_matches_brute_force():
    rng = np.random.default_rng(1)
    hu = np.full((30, 40, 50), -1000, np.int16)
    body = np.zeros(hu.shape, bool)
    body[5:25, 7:31, 6:43] = True
    hu[body] = rng.integers(-200, 200, body.sum())
    hu[8:20, 12:25, 10:40][rng.random((12, 13, 30)) < 0.3] = -900  # gas inside the body
    for face in (np.s_[5, :, :], np.s_[:, 7, :], np.s_[:, :, 42]):  # ragged faces
        hu[face][body[face] & (rng.random(body[face].shape) < 0.6)] = -1000
    hu[10:20, 36:39, 2:48] = 100  # a table, separated from the body by an air gap
    hu[27, 2, 3] = 300  # a bright speck in the air
    lower, upper = [10**9] * 3, [-1] * 3
    for z, y, x in np.ndindex(*hu.shape):
        if body[z, y, x] and hu[z, y, x] > -500:
            for axis, i in enumerate((x, y, z)):
                lower[axis], upper[axis] = min(lower[axis], i), max(upper[axis], i)
    image = from_array(hu, Geometry((50, 40, 30), (0.8, 1.0, 2.5), (3.0, -2.0, 1.0), tuple(np.eye(3).ravel())))
    margin_mm = 3.0
    out, record = CropBody(margin_mm=margin_mm)(Sample(image))
    margin = [math.ceil(margin_mm / s) for s in image.GetSpacing()]
    expected_lower = [max(0, lower[a] - margin[a]) for a in range(3)]
    expected_upper = [max(0, image.GetSize()[a] - 1 - upper[a] - margin[a]) for a in range(3)]
    assert record == {"lower": expected_lower, "upper": expected_upper}
    assert out.image.GetOrigin() == image.TransformIndexToPhysicalPoint(expected_lower)
    back = CropBody().invert_label(sitk.Cast(out.image > 0, sitk.sitkUInt8), record)
    assert Geometry.of(back).matches(Geometry.of(image), tol=1e-9)


def test_crop_keeps_an_all_air_scan_whole():
    image = from_array(np.full((4, 5, 6), -1000, np.int16), Geometry((6, 5, 4), (1.0,) * 3, (0.0,) * 3,
                                                                     tuple(np.eye(3).ravel())))
    out, record = CropBody()(Sample(image))
    assert out.image.GetSize() == image.GetSize() and record == {"lower": [0] * 3, "upper": [0] * 3}


def test_clip_zscore_against_numpy():
    rng = np.random.default_rng(2)
    hu = rng.normal(0, 500, (6, 7, 8)).astype(np.float32)
    image = from_array(hu, Geometry((8, 7, 6), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel())))
    out, record = ClipZScore(-320, 320)(Sample(image))
    clipped = np.clip(hu.astype(np.float64), -320, 320)
    assert record["mean"] == pytest.approx(clipped.mean()) and record["std"] == pytest.approx(clipped.std())
    result = to_array(out.image)
    assert result.mean() == pytest.approx(0, abs=1e-5) and result.std() == pytest.approx(1, abs=1e-5)
    assert np.allclose(result, (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    fixed = to_array(ClipZScore(-320, 320, mean=10.0, std=100.0)(Sample(image))[0].image)
    assert np.allclose(fixed, (clipped - 10) / 100, atol=1e-5)


def test_bspline_weights_match_scipy_with_and_without_smoothing():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 37):
        samples = rng.normal(size=n)
        positions = np.linspace(-0.5, n - 0.5, 23)
        for sigma in (0.0, 0.7, 2.5):
            smoothed = ndimage.gaussian_filter1d(samples, sigma, mode="mirror") if sigma else samples
            expected = ndimage.map_coordinates(smoothed, [positions], order=3, mode="mirror")
            assert np.allclose(bspline_matrix(n, positions, sigma) @ samples, expected, atol=1e-10), (n, sigma)


def test_separable_products_match_einsum():
    rng = np.random.default_rng(6)
    volume = rng.integers(-1000, 1000, (23, 19, 41)).astype(np.int16)
    weights = [bspline_matrix(n, np.linspace(0, n - 1, m), 0.8) for n, m in zip(volume.shape, (9, 40, 17))]
    expected = np.einsum("az,by,cx,zyx->abc", *weights, volume.astype(np.float64))
    assert np.allclose(apply_separable(volume, weights, chunk_voxels=2000), expected, atol=1e-3)


def grid_image(size, spacing, direction, values=None) -> sitk.Image:
    geometry = Geometry(size, spacing, (-5.0, 12.0, 3.0), tuple(np.asarray(direction, float).ravel()))
    return from_array(np.zeros(size[::-1], np.float32) if values is None else values, geometry)


def test_resample_reproduces_a_linear_ramp_in_physical_space():
    image = grid_image((60, 50, 40), (1.0, 1.2, 2.0), DIRECTIONS["oblique"])
    ramp = physical_points(image) @ [0.5, -0.3, 0.8] + 10.0
    image = from_array(ramp.astype(np.float32), image)
    for antialias in (True, False):
        out = Resample(in_plane=[24, 20], z_spacing=3.0, antialias=antialias)(Sample(image))[0].image
        expected = physical_points(out) @ [0.5, -0.3, 0.8] + 10.0
        inside = np.ones(expected.shape, bool)
        for axis, n in enumerate(out.GetSize()[::-1]):  # away from the mirrored borders
            keep = np.zeros(n, bool)
            keep[math.ceil(n * 0.25):math.floor(n * 0.75)] = True
            inside &= np.expand_dims(keep, [a for a in range(3) if a != axis])
        assert np.abs(to_array(out) - expected)[inside].max() < 1e-3
    assert out.GetSize() == (24, 20, round(40 * 2.0 / 3.0))


def test_resample_matches_simpleitk_bspline_on_a_smooth_function():
    image = grid_image((50, 45, 30), (0.9, 0.8, 1.5), DIRECTIONS["ras"])
    p = physical_points(image)
    smooth = 100 * np.sin(p[..., 0] / 9) * np.cos(p[..., 1] / 7) + 50 * np.sin(p[..., 2] / 11)
    image = from_array(smooth.astype(np.float32), image)
    out = Resample(in_plane=[20, 25], z_spacing=2.0, antialias=False)(Sample(image))[0].image
    grid = Geometry.of(out)
    reference = sitk.Resample(image, grid.size, sitk.Transform(), sitk.sitkBSpline, grid.origin, grid.spacing,
                              grid.direction, 0.0, sitk.sitkFloat32)
    assert np.abs(to_array(out) - sitk.GetArrayViewFromImage(reference)).max() < 1e-3


def test_antialiased_resample_matches_scipy_at_simpleitk_positions():
    rng = np.random.default_rng(4)
    image = grid_image((33, 29, 21), (0.7, 0.9, 1.1), DIRECTIONS["lps"], rng.normal(size=(21, 29, 33)))
    out = Resample(in_plane=[10, 12], z_spacing=2.9)(Sample(image))[0].image
    # where each output voxel lies in input index units, found by SimpleITK from the two headers
    index = np.array([[image.TransformPhysicalPointToContinuousIndex(out.TransformIndexToPhysicalPoint(i))
                       for i in np.ndindex(*out.GetSize())]]).reshape(-1, 3)
    steps = [o / i for o, i in zip(out.GetSpacing(), image.GetSpacing())]
    sigmas = [max(0.0, (s - 1) / 2) for s in steps][::-1]
    smoothed = ndimage.gaussian_filter(to_array(image).astype(np.float64), sigmas, mode="mirror")
    expected = ndimage.map_coordinates(smoothed, index[:, ::-1].T, order=3, mode="mirror")
    assert np.allclose(to_array(out).transpose(2, 1, 0).ravel(), expected, atol=1e-4)


def test_label_vote_matches_dense_one_hot_argmax():
    rng = np.random.default_rng(5)
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[2:9, 3:12, 4:10] = 1
    labels[5:11, 1:7, 8:15] = 3
    labels[rng.random(labels.shape) < 0.05] = 7
    weights = [linear_matrix(n, np.linspace(-0.4, n - 0.6, m), (n / m)) for n, m in zip(labels.shape, (7, 20, 9))]
    scores = {v: np.einsum("az,by,cx,zyx->abc", *weights, (labels == v).astype(float)) for v in (0, 1, 3, 7)}
    values = np.array(list(scores))
    stacked = np.stack([scores[v] for v in values])
    expected = values[np.argmax(stacked, axis=0)]
    margin = np.sort(stacked, axis=0)
    clear = margin[-1] - margin[-2] > 1e-5  # ties may break either way
    assert np.array_equal(vote(labels, weights)[clear], expected[clear])
    assert all(np.allclose(w.sum(axis=1), 1) and (w >= 0).all() for w in weights)
    samples, inside = rng.normal(size=9), np.linspace(0, 8, 17)
    assert np.allclose(linear_matrix(9, inside, 1.0) @ samples, np.interp(inside, np.arange(9), samples))


def test_invert_labels_accepts_an_array_and_refuses_the_wrong_grid():
    image, label = synthetic(DIRECTIONS["ras"], size=(20, 18, 16))
    pipeline = build_pipeline(SMALL)
    sample, records = run_pipeline(pipeline, Sample(image, label))
    from_image = invert_labels(pipeline, sample.label, records)
    from_array_ = invert_labels(pipeline, sitk.GetArrayFromImage(sample.label), records)
    assert np.array_equal(sitk.GetArrayViewFromImage(from_image), sitk.GetArrayViewFromImage(from_array_))
    with pytest.raises(ValueError, match="preprocessed grid"):
        invert_labels(pipeline, label, records)


def test_pipeline_contract_and_option_errors():
    assert all(isinstance(step, Preprocessor) for step in build_pipeline(PAPER))
    with pytest.raises(ConfigError, match=r"preprocess\[0\]\.size: unknown option"):
        build_pipeline([("resample", {"size": 3})])
    with pytest.raises(UnknownPluginError, match="unknown preprocessor 'resize'"):
        build_pipeline([("resize", {})])
    with pytest.raises(ConfigError, match="in_plane"):
        Resample(in_plane=[160])
    with pytest.raises(ConfigError, match="low"):
        ClipZScore(low=10, high=-10)
    with pytest.raises(ConfigError, match="orientation"):
        Reorient("LPL")
    image, label = synthetic(DIRECTIONS["lps"], size=(8, 8, 8))
    shifted = sitk.Image(label)
    shifted.SetOrigin((1.0, 2.0, 3.0))
    with pytest.raises(DataError, match="different grids"):
        run_pipeline(build_pipeline(SMALL), Sample(image, shifted))


def test_permute_flip_is_its_own_inverse_when_undone():
    image, _ = synthetic(DIRECTIONS["oblique-permuted"], size=(6, 5, 4))
    out = permute_flip(image, [2, 0, 1], [True, False, True])
    back = permute_flip(out, [1, 2, 0], [False, True, True])
    assert Geometry.of(back).matches(Geometry.of(image), tol=1e-9)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


@pytest.mark.parametrize("speckle", [0.0, 0.3])  # few mixed voxels (scored one by one), most (whole slabs)
def test_label_vote_when_upsampling_matches_dense_one_hot_argmax(speckle):
    """The two-tap path (every output between two inputs per axis, as when a prediction goes back to the
    original grid) against the dense computation, including positions past the borders."""
    from seg.plugins.resampling import _two_taps

    rng = np.random.default_rng(7)
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[2:10, 4:12, 2:12] = 2
    labels[6:12, 0:8, 8:16] = 5
    labels[rng.random(labels.shape) < speckle] = 9
    weights = [linear_matrix(n, np.linspace(-0.45, n - 0.55, m), 1.0) for n, m in zip(labels.shape, (26, 40, 34))]
    assert all(_two_taps(w) is not None for w in weights)
    values = np.array([0, 2, 5, 9])
    stacked = np.stack([np.einsum("az,by,cx,zyx->abc", *weights, (labels == v).astype(float)) for v in values])
    expected = values[np.argmax(stacked, axis=0)]
    margin = np.sort(stacked, axis=0)
    clear = margin[-1] - margin[-2] > 1e-5  # nearer ties may break either way in float32
    assert clear.mean() > 0.9
    got = vote(labels, weights)
    assert got.dtype == np.uint8 and got.shape == (26, 40, 34)
    assert np.array_equal(got[clear], expected[clear])
    exact_tie = np.isclose(margin[-1], margin[-2], atol=1e-12) & np.isclose(margin[-1], stacked[0])
    assert (got[exact_tie] == 0).all()  # background wins ties, as in the general path


def test_two_taps_refuses_wider_kernels():
    from seg.plugins.resampling import _two_taps

    assert _two_taps(linear_matrix(20, np.linspace(0, 19, 7), 20 / 7)) is None  # shrinking: up to 6 taps
    first, second = _two_taps(linear_matrix(5, np.array([0.0, 0.25, 3.5, 4.0]), 1.0))
    assert first.tolist() == [0, 0, 3, 4] and second.tolist() == [0.0, 0.25, 0.5, 0.0]
