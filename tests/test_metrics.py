"""DSC and NSD against independent computations: hand-computed surfel areas, analytic geometry (boxes, spheres),
a brute-force NSD, values produced by the official FLARE22 evaluation code, and FLARE22's rules."""

import itertools
import json

import numpy as np
import pytest
from scipy import ndimage

from seg.core.metrics import (FLARE22_TOLERANCES, corner_codes, dice, evaluate_case, normalized_surface_dice,
                              surfel_area_table)

ALL = {v: str(v) for v in range(1, 14)}


def cell_area(inside_voxels, spacing=(1.0, 1.0, 1.0)) -> float:
    """Surfel area of the 2x2x2 neighbourhood whose listed voxels (a, b, c) are inside."""
    cube = np.zeros((2, 2, 2), bool)
    for voxel in inside_voxels:
        cube[voxel] = True
    return float(surfel_area_table(spacing)[corner_codes(cube)[1, 1, 1]])


def ball(shape, center, radius, spacing):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= radius ** 2


def blobs(seed, shape, sigma):
    rng = np.random.default_rng(seed)
    return tuple(ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5 for _ in range(2))


def test_dice_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((6, 7, 8)) > 0.5, rng.random((6, 7, 8)) > 0.6
        inter = sum(1 for idx in np.ndindex(a.shape) if a[idx] and b[idx])
        assert dice(a, b) == pytest.approx(2 * inter / (a.sum() + b.sum()))
    empty = np.zeros((2, 2, 2), bool)
    assert dice(empty, empty) == 1.0 and dice(empty, ~empty) == 0.0


def test_surfel_areas_of_hand_computed_neighbourhoods():
    root3 = np.sqrt(3)
    assert cell_area([]) == 0 and cell_area(list(itertools.product((0, 1), repeat=3))) == 0
    assert cell_area([(0, 0, 0)]) == pytest.approx(root3 / 8)  # triangle of side sqrt(2)/2
    assert cell_area([(0, 0, 0), (0, 0, 1)]) == pytest.approx(np.sqrt(2) / 2)  # 1 x sqrt(2)/2 rectangle
    assert cell_area([(0, b, c) for b in (0, 1) for c in (0, 1)]) == pytest.approx(1.0)  # unit square
    assert cell_area([(0, 0, 0), (0, 1, 1)]) == pytest.approx(2 * root3 / 8)  # face diagonal: two triangles
    # a voxel and its three neighbours: a regular hexagon of side sqrt(2)/2 (planar)
    assert cell_area([(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]) == pytest.approx(3 * root3 / 4)
    # an L of three voxels: a non-planar pentagon; the reference table splits it into the right triangle of
    # the mid-plane (1/2) plus triangles of 3*sqrt(3)/8 and sqrt(3)/8 (its largest-area split)
    assert cell_area([(0, 0, 0), (0, 0, 1), (0, 1, 0)]) == pytest.approx(0.5 + 3 * root3 / 8)


def test_surfel_areas_scale_with_anisotropic_spacing():
    s0, s1, s2 = 2.5, 0.8, 0.6
    sp = (s0, s1, s2)
    assert cell_area([(0, b, c) for b in (0, 1) for c in (0, 1)], sp) == pytest.approx(s1 * s2)
    assert cell_area([(0, 0, 0), (0, 0, 1)], sp) == pytest.approx(s2 * np.hypot(s0 / 2, s1 / 2))
    corner = 0.5 * np.linalg.norm([s1 * s2 / 4, s0 * s2 / 4, s0 * s1 / 4])
    assert cell_area([(0, 0, 0)], sp) == pytest.approx(corner)


def test_surfel_areas_are_symmetric_under_rotations_reflections_and_complement():
    spacing = np.array([2.5, 0.8, 1.3])
    tables = {perm: surfel_area_table(spacing[list(perm)]) for perm in itertools.permutations(range(3))}
    for bits in range(256):
        cube = np.array([bits >> i & 1 for i in range(8)], bool).reshape(2, 2, 2)
        area = tables[(0, 1, 2)][corner_codes(cube)[1, 1, 1]]
        assert tables[(0, 1, 2)][corner_codes(~cube)[1, 1, 1]] == pytest.approx(area)
        for perm, table in tables.items():
            for flips in itertools.product((False, True), repeat=3):
                other = np.flip(cube.transpose(perm), [a for a in range(3) if flips[a]])
                assert table[corner_codes(other)[1, 1, 1]] == pytest.approx(area)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.6)])
def test_box_surface_area_is_the_chamfered_box(spacing):
    n = (5, 7, 4)
    mask = np.zeros((9, 11, 8), bool)
    mask[2:7, 2:9, 2:6] = True
    s = spacing
    faces = sum(2 * (n[(a + 1) % 3] - 1) * (n[(a + 2) % 3] - 1) * s[(a + 1) % 3] * s[(a + 2) % 3] for a in range(3))
    edges = sum(4 * (n[a] - 1) * s[a] * np.hypot(s[(a + 1) % 3] / 2, s[(a + 2) % 3] / 2) for a in range(3))
    corners = 8 * 0.5 * np.linalg.norm([s[1] * s[2] / 4, s[0] * s[2] / 4, s[0] * s[1] / 4])
    assert surfel_area_table(spacing)[corner_codes(mask)].sum() == pytest.approx(faces + edges + corners)


def test_identical_far_and_empty_masks():
    pred, gt = blobs(3, (10, 12, 12), 1.5)
    assert normalized_surface_dice(pred, pred, (2.5, 0.8, 0.8), 0.0) == 1.0
    far_a, far_b = np.zeros((30, 8, 8), bool), np.zeros((30, 8, 8), bool)
    far_a[2:5, 2:5, 2:5] = True
    far_b[20:25, 2:6, 1:5] = True
    assert normalized_surface_dice(far_a, far_b, (1.0, 1.0, 1.0), 14.0) == 0.0
    assert normalized_surface_dice(far_a, far_b, (1.0, 1.0, 1.0), 30.0) == 1.0
    empty = np.zeros_like(far_a)
    assert normalized_surface_dice(empty, empty, (1, 1, 1), 2) == 1.0
    assert normalized_surface_dice(far_a, empty, (1, 1, 1), 2) == 0.0
    assert normalized_surface_dice(empty, far_a, (1, 1, 1), 2) == 0.0


def test_cube_shifted_along_the_coarse_axis():
    n, k, s = 6, 2, (2.5, 0.8, 0.9)
    gt = np.zeros((n + k + 4, n + 4, n + 4), bool)
    gt[2:2 + n, 2:2 + n, 2:2 + n] = True
    pred = np.roll(gt, k, axis=0)  # k slices = 5 mm
    assert normalized_surface_dice(pred, gt, s, k * s[0]) == 1.0
    assert normalized_surface_dice(pred, gt, s, 100.0) == 1.0
    # Below the smallest spacing only coinciding surfels count: the pred's side walls from its bottom rim up
    # to the gt's top (n - k rows of side corners plus the bottom rim), and the same area of the gt by symmetry
    F1, F2 = s[0] * s[2], s[0] * s[1]
    E0, E1, E2 = (s[a] * np.hypot(s[(a + 1) % 3] / 2, s[(a + 2) % 3] / 2) for a in range(3))
    C = 0.5 * np.linalg.norm([s[1] * s[2] / 4, s[0] * s[2] / 4, s[0] * s[1] / 4])
    total = 2 * (n - 1) ** 2 * (s[1] * s[2] + F1 + F2) + 4 * (n - 1) * (E0 + E1 + E2) + 8 * C
    shared = (n - k) * (2 * (n - 1) * (F1 + F2) + 4 * E0) + 2 * (n - 1) * (E1 + E2) + 4 * C
    for tol in (0.0, 0.5, 0.79):
        assert normalized_surface_dice(pred, gt, s, tol) == pytest.approx(shared / total)
    assert shared / total < normalized_surface_dice(pred, gt, s, 4.99) < 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.8, 0.8)])
def test_concentric_spheres(spacing):
    r1, r2 = 9.0, 14.0
    shape = tuple(int(2 * (r2 + 3) / s) for s in spacing)
    center = tuple((n - 1) / 2 for n in shape)
    inner, outer = ball(shape, center, r1, spacing), ball(shape, center, r2, spacing)
    diagonal = float(np.linalg.norm(spacing))  # surfels lie within half a voxel diagonal of the true sphere
    values = [normalized_surface_dice(inner, outer, spacing, t) for t in np.arange(0.0, 9.0, 0.5)]
    assert values == sorted(values)
    for t, value in zip(np.arange(0.0, 9.0, 0.5), values):
        if t < (r2 - r1) - diagonal:
            assert value == 0.0, t
        if t >= (r2 - r1) + diagonal:
            assert value == 1.0, t


def test_shifted_spheres_follow_the_analytic_curve():
    """Sphere A (radius r) against the same sphere moved by d along axis 0: a point of A at cos(angle) = u
    lies |sqrt(r^2 - 2 r d u + d^2) - r| from B, and area is uniform in u; discrete surfels sit within half a
    voxel diagonal of the true spheres, so NSD(t) lies between the analytic curve at t -/+ one diagonal."""
    r, d, spacing = 14.0, 6.0, (1.0, 1.0, 1.0)
    a = ball((48, 40, 40), (17, 19.5, 19.5), r, spacing)
    b = ball((48, 40, 40), (17 + d, 19.5, 19.5), r, spacing)
    u = np.linspace(-1, 1, 100001)
    distance = np.abs(np.sqrt(r * r - 2 * r * d * u + d * d) - r)
    diagonal = np.sqrt(3)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        value = normalized_surface_dice(a, b, spacing, t)
        assert np.mean(distance <= t - diagonal) <= value <= np.mean(distance <= t + diagonal)


def brute_force_nsd(pred, gt, spacing, tol):
    """The surfel definition written out: corner codes by correlation, every pairwise corner distance."""
    weights = np.array([1 << (4 * a + 2 * b + c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]).reshape(2, 2, 2)

    def surfels(mask):
        codes = ndimage.correlate(np.pad(mask, 1).astype(np.int64), weights, mode="constant", origin=-1)
        codes = codes[:mask.shape[0] + 1, :mask.shape[1] + 1, :mask.shape[2] + 1]
        border = (codes > 0) & (codes < 255)
        return np.argwhere(border), surfel_area_table(spacing)[codes[border]]

    (points_p, area_p), (points_g, area_g) = surfels(pred), surfels(gt)
    # index offsets times spacing, squares summed x, y, z: the reference's arithmetic, so ties break alike
    offsets_mm = (points_p[:, None, :] - points_g[None, :, :]) * np.asarray(spacing, float)
    gaps = np.sqrt((offsets_mm ** 2)[..., ::-1].sum(-1))
    near_p, near_g = gaps.min(axis=1) <= tol, gaps.min(axis=0) <= tol
    return (area_p[near_p].sum() + area_g[near_g].sum()) / (area_p.sum() + area_g.sum())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spacing, tol", [((1, 1, 1), 1.0), ((2.5, 0.8, 0.75), 2.0), ((2.5, 1.0, 1.0), 5.0),
                                          ((3, 1, 1), 0.0), ((1.5, 0.8, 0.8), 1.7), ((1.5, 0.8, 0.8), 2.4)])
def test_nsd_matches_brute_force_on_random_blobs(seed, spacing, tol):
    pred, gt = blobs(seed, (8, 10, 9), 1.2)
    if not pred.any() or not gt.any():
        pytest.skip("empty blob")
    assert normalized_surface_dice(pred, gt, spacing, tol) == pytest.approx(brute_force_nsd(pred, gt, spacing, tol),
                                                                           rel=1e-12)


# Values printed by the official FLARE22 evaluation code (JunMa11/FLARE, FLARE22/Evaluation/SurfaceDice.py,
# commit aad2cc2) for the same masks, given as x, y, z arrays with spacing x, y, z as that code reads NIfTI.
@pytest.mark.parametrize("seed, shape, sigma, spacing, tol, expected", [
    (0, (12, 20, 18), 2.0, (2.5, 0.8, 0.75), 2.0, 0.8675994437081215),
    (1, (16, 16, 16), 1.5, (1.0, 1.0, 1.0), 1.0, 0.8161104976012769),
    (2, (10, 24, 24), 2.5, (5.0, 0.7421875, 0.7421875), 5.0, 0.9767845421266028),
])
def test_nsd_matches_the_official_flare22_code(seed, shape, sigma, spacing, tol, expected):
    pred, gt = blobs(seed, shape, sigma)
    assert normalized_surface_dice(pred, gt, spacing, tol) == pytest.approx(expected, abs=1e-12)


REFERENCE_REAL_CT = {  # official FLARE22_DSC_NSD_Eval.py loop on the case below, spacing x, y, z = 3.0, 2.5, 5.0 mm
    1: (0.9473201584745066, 0.9994997191521628), 2: (0.8957186954771171, 0.9767064659704471),
    3: (0.9126836852399819, 0.986329830929569), 4: (0.6637554585152838, 1.0),
    5: (0.6187525815778604, 0.34332778483605964), 6: (0.8176614881439084, 0.5288354915022999),
    7: (0.0, 0.0), 8: (0.562992125984252, 0.5894130557079431), 9: (0.8430525557955364, 0.5337705511190921),
    10: (0.5714285714285714, 0.970492090379099), 11: (0.8636184469846275, 1.0), 12: (0.8319211822660099, 1.0),
    13: (0.8145624452448165, 0.9343602338008818),
}


def test_real_ct_case_matches_the_official_flare22_evaluation(real_ct):
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(real_ct / "example_seg_fast_force_split.nii.gz")))
    mapping = json.loads((real_ct / "flare22_labels.json").read_text())["totalsegmentator_total_to_flare22"]
    lut = np.zeros(int(labels.max()) + 1, np.uint8)
    for total, flare in mapping.items():
        lut[int(total)] = flare
    gt = lut[labels]
    tube = gt[40:80, 45:48, 60:63]  # the file has no esophagus: add one so its slice rule is exercised
    tube[tube == 0] = 10
    pred = ndimage.grey_dilation(np.roll(gt, 1, axis=2), size=(1, 2, 1))
    pred[pred == 7] = 0  # right adrenal missed
    pred[5:8, 5:8, 5:8] = 9  # far false-positive gallbladder blob
    pred[20:100, 30:35, 30:35] = 5  # aorta, mostly outside the ground truth's slices
    scores = evaluate_case(pred, gt, (5.0, 2.5, 3.0), ALL, FLARE22_TOLERANCES)
    for value, expected in REFERENCE_REAL_CT.items():
        assert scores[value] == pytest.approx(expected, abs=1e-12), value


def test_flare_empty_rules():
    gt = np.zeros((6, 8, 8), np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    pred = np.zeros_like(gt)
    pred[2:5, 4:7, 4:7] = 9
    scores = evaluate_case(pred, gt, (2.0, 1.0, 1.0), ALL, FLARE22_TOLERANCES)
    assert scores[1] == (0.0, 0.0)  # only in the ground truth
    assert scores[9] == (0.0, 0.0)  # only in the prediction
    assert scores[3] == (1.0, 1.0)  # in neither


def test_slice_rule_for_aorta_ivc_esophagus_follows_the_reference():
    """Only the ground truth's axial extent counts, and the reference's range excludes its last slice."""
    gt = np.zeros((12, 10, 10), np.uint8)
    gt[3:8, 2:5, 2:5] = 5
    gt[3:8, 6:9, 6:9] = 7
    pred = gt.copy()
    pred[0:2, 2:5, 2:5] = 5  # aorta above and below the ground truth: ignored
    pred[9:12, 2:5, 2:5] = 5
    pred[7] = 0  # both organs missed on the ground truth's last slice
    pred[8:10, 6:9, 6:9] = 7  # adrenal false positive below it: counted
    scores = evaluate_case(pred, gt, (1.0, 1.0, 1.0), ALL, FLARE22_TOLERANCES)
    assert scores[5] == (1.0, 1.0)
    assert scores[7][0] == pytest.approx(2 * 4 * 9 / (5 * 9 + 6 * 9))
    as_normal = evaluate_case(pred, gt, (1.0, 1.0, 1.0), ALL, FLARE22_TOLERANCES, slice_limited=())
    assert as_normal[5][0] == pytest.approx(2 * 4 * 9 / (5 * 9 + 9 * 9))


def test_slice_rule_on_a_single_slice_scores_that_slice():
    gt = np.zeros((5, 8, 8), np.uint8)
    gt[2, 2:6, 2:6] = 10
    pred = gt.copy()
    pred[2, 2:6, 2] = 0
    pred[4, 2:6, 2:6] = 10
    dsc, nsd = evaluate_case(pred, gt, (2.5, 0.8, 0.8), {10: "esophagus"}, FLARE22_TOLERANCES)[10]
    assert dsc == pytest.approx(2 * 12 / (16 + 12))
    assert nsd == pytest.approx(normalized_surface_dice(pred[2:3] == 10, gt[2:3] == 10, (2.5, 0.8, 0.8), 3.0))


def _plates():
    """Two 1-voxel-thick plates one voxel apart (1 mm): no voxel shared (DSC 0), yet every surface element of
    each lies within 1 mm of the other's surface (NSD 1 at a 2 mm tolerance, by hand)."""
    gt = np.zeros((6, 12, 12), np.uint8)
    gt[2, 2:10, 2:10] = 1
    pred = np.zeros_like(gt)
    pred[3, 2:10, 2:10] = 1
    return pred, gt


def test_rule_2022_scores_nsd_even_where_dsc_is_below_0_2():
    """FLARE22's evaluation as the challenge ran it (the paper's numbers): NSD is computed whatever the DSC."""
    pred, gt = _plates()
    assert evaluate_case(pred, gt, (1.0, 1.0, 1.0), {1: "liver"}, {1: 2.0}) == {1: (0.0, 1.0)}  # the default
    assert evaluate_case(pred, gt, (1.0, 1.0, 1.0), {1: "liver"}, {1: 2.0}, rule="2022") == {1: (0.0, 1.0)}


def test_rule_2024_scores_nsd_0_where_dsc_is_below_0_2_and_only_there():
    pred, gt = _plates()
    assert evaluate_case(pred, gt, (1.0, 1.0, 1.0), {1: "liver"}, {1: 2.0}, rule="2024") == {1: (0.0, 0.0)}
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[1, 1, 1:6] = 1  # 5 voxels
    pred = np.zeros_like(gt)
    pred[1, 1, 5:7] = 1
    pred[1, 2, 5:8] = 1  # 5 voxels, 1 shared: DSC = 2 * 1 / 10, exactly 0.2 (not below: NSD kept)
    at_02 = evaluate_case(pred, gt, (1.0, 1.0, 1.0), {1: "liver"}, {1: 5.0}, rule="2024")[1]
    assert at_02 == evaluate_case(pred, gt, (1.0, 1.0, 1.0), {1: "liver"}, {1: 5.0}, rule="2022")[1]
    assert at_02[0] == 0.2 and at_02[1] > 0
    with pytest.raises(ValueError, match="2023"):
        evaluate_case(pred, gt, (1.0, 1.0, 1.0), {1: "liver"}, {1: 5.0}, rule="2023")
