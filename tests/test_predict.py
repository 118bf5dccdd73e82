"""seg predict on real CT: every file of ../shared/data/real-ct (NIfTI in RAS and LPS, DICOM series, a 3-slice
scan far shorter than the window) and synthetic flipped/oblique images get a label map on exactly their grid."""

import numpy as np
import pytest
import SimpleITK as sitk

from seg.core.console import set_quiet
from seg.core.predict import load_predictor, predict_paths
from seg.core.synth import synthetic_case


@pytest.fixture(scope="module")
def predictor(smoke_run):
    return smoke_run


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing()) and \
        np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())


@pytest.mark.parametrize("name", ["example_ct.nii.gz", "example_ct_dicom", "more/lps_ct_cropped.nii.gz",
                                  "more/ge_3slice/ct-3slice"])
def test_real_ct_lands_on_its_own_grid(predictor, real_ct, tmp_path, name):
    source = real_ct / name
    out = tmp_path / "label.nii.gz"
    summary = predict_paths(source, out, predictor, device="cpu")
    assert summary["done"] == 1
    from seg.core.io import read_image

    image, label = read_image(source), sitk.ReadImage(str(out))
    assert same_grid(image, label) and label.GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, 1, 0, 0, 0, -1), (0, 1, 0, 1, 0, 0, 0, 0, 1)])
def test_flipped_and_permuted_synthetic_images(predictor, direction):
    image, _ = synthetic_case(3, direction=direction)
    label = load_predictor(predictor, device="cpu").labels_for(image)
    assert same_grid(image, label)


def test_oblique_synthetic_image(predictor):
    angle = np.deg2rad(7)
    c, s = np.cos(angle), np.sin(angle)
    image, _ = synthetic_case(4, direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    label = load_predictor(predictor, device="cpu").labels_for(image)
    assert same_grid(image, label)
