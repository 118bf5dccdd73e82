"""``seg data check``: every broken file of a dataset is reported, with the right severity; real CT passes and a
real MR scan is flagged as not CT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from rich.console import Console

from seg.core import check, io
from seg.core.check import Problem, check_dataset, image_problems, render_problems
from seg.core.dataset import FLARE22_LABELS, write_dataset_json


def _ct(shape=(8, 10, 12), spacing=(1.5, 1.5, 3.0), body=40, dtype=np.int16) -> sitk.Image:
    """A tiny CT-like volume (z, y, x): air at -1000 HU around a soft-tissue block."""
    array = np.full(shape, -1000, dtype)
    array[2:-2, 2:-2, 2:-2] = body
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _label(like: sitk.Image, value: int = 1) -> sitk.Image:
    array = np.zeros(sitk.GetArrayViewFromImage(like).shape, np.uint8)
    array[3:5, 3:6, 3:6] = value
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(like)
    return label


def _save(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _case(root: Path, name: str, image: sitk.Image, label: sitk.Image | None) -> None:
    _save(image, root / "imagesTr" / f"{name}_0000.nii.gz")
    if label is not None:
        _save(label, root / "labelsTr" / f"{name}.nii.gz")


def test_a_sound_dataset_with_real_ct_has_no_problem(tmp_path, real_ct):
    root = tmp_path / "data"
    image = _ct()
    _case(root, "tiny", image, _label(image))
    # real CT with TotalSegmentator's classes mapped onto the FLARE22 labels (written to tmp, read in place)
    mapping = json.loads((real_ct / "flare22_labels.json").read_text())["totalsegmentator_total_to_flare22"]
    seg = sitk.ReadImage(str(real_ct / "example_seg_fast_force_split.nii.gz"))
    lut = np.zeros(256, np.uint8)
    for source, target in mapping.items():
        lut[int(source)] = target
    flare = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(seg)])
    flare.CopyInformation(seg)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    os.symlink(real_ct / "example_ct.nii.gz", root / "imagesTr" / "real_0000.nii.gz")
    _save(flare, root / "labelsTr" / "real.nii.gz")
    (root / "unlabeled").mkdir()
    os.symlink(real_ct / "example_ct_dicom", root / "unlabeled" / "dicom")
    os.symlink(real_ct / "more" / "lps_ct_cropped.nii.gz", root / "unlabeled" / "crop_0000.nii.gz")
    os.symlink(real_ct / "more" / "ge_3slice" / "ct-3slice", root / "unlabeled" / "ge3")  # -3024 padding
    write_dataset_json(root, FLARE22_LABELS, 2)
    assert check_dataset(root) == []


def test_every_broken_file_is_reported_with_its_severity(tmp_path, real_ct):
    root = tmp_path / "data"
    good = _ct((16, 16, 16))
    _case(root, "ok", good, _label(good))
    good_bytes = (root / "imagesTr" / "ok_0000.nii.gz").read_bytes()

    (root / "imagesTr" / "trunc_0000.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
    _save(_label(good), root / "labelsTr" / "trunc.nii.gz")
    (root / "imagesTr" / "text_0000.nii.gz").write_text("this is not an image\n")
    _save(_label(good), root / "labelsTr" / "text.nii.gz")
    _save(sitk.GetImageFromArray(np.full((10, 12), -1000, np.int16)), root / "imagesTr" / "flat_0000.nii.gz")
    _save(_label(good), root / "labelsTr" / "flat.nii.gz")
    _save(sitk.GetImageFromArray(np.full((2, 4, 5, 6), -1000, np.int16), isVector=False), root / "imagesTr" / "time_0000.nii.gz")
    _save(_label(good), root / "labelsTr" / "time.nii.gz")
    moved = _label(good)
    moved.SetSpacing((1.5, 1.5, 2.5))
    _case(root, "grid", good, moved)
    _case(root, "values", good, _label(good, value=20))
    _case(root, "empty", good, _label(good, value=0))
    _case(root, "mr", good, _label(good))
    (root / "imagesTr" / "mr_0000.nii.gz").unlink()
    os.symlink(real_ct / "more" / "example_mr_sm.nii.gz", root / "imagesTr" / "mr_0000.nii.gz")
    (root / "labelsTr" / "mr.nii.gz").unlink()
    mr = sitk.ReadImage(str(real_ct / "more" / "example_mr_sm.nii.gz"))
    _save(_label(mr), root / "labelsTr" / "mr.nii.gz")
    nan = sitk.GetArrayFromImage(_ct(dtype=np.float32))
    nan[1, 2, 3] = np.nan  # in a slice the intensity sample skips: still found
    _save(sitk.GetImageFromArray(nan), root / "imagesTr" / "nan_0000.nrrd")  # ITK's NIfTI reader zeroes NaN
    _save(_label(sitk.GetImageFromArray(nan)), root / "labelsTr" / "nan.nii.gz")
    blank = _ct(body=-1000)
    _case(root, "blank", blank, _label(blank))
    wide = _ct(spacing=(1.5, 1.5, 50.0))
    _case(root, "wide", wide, _label(wide))
    _save(good, root / "imagesTr" / "nosuffix.nii.gz")
    _save(_label(good), root / "labelsTr" / "nosuffix.nii.gz")
    _save(_label(good), root / "labelsTr" / "orphan.nii.gz")
    _save(good, root / "unlabeled" / "fine_0000.nii.gz")
    (root / "unlabeled" / "cut_0000.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
    (root / "unlabeled" / "junk_0000.nii.gz").write_text("junk")
    (root / "unlabeled" / "notes.txt").write_text("not a scan")
    os.symlink(real_ct / "more" / "example_mr_sm.nii.gz", root / "unlabeled" / "mr2_0000.nii.gz")
    write_dataset_json(root, FLARE22_LABELS, 3)

    problems = check_dataset(root)
    found = {}
    for p in problems:
        found.setdefault(p.file, []).append(p)

    def only(file: str, words: str, fatal: bool = True) -> None:
        assert file in found, f"{file} not reported"
        assert len(found[file]) == 1, found[file]
        assert words in found[file][0].problem, found[file][0].problem
        assert found[file][0].fatal is fatal

    only("imagesTr/trunc_0000.nii.gz", "truncated")
    only("imagesTr/text_0000.nii.gz", "not a readable image")
    only("imagesTr/flat_0000.nii.gz", "a 2D image")
    only("imagesTr/time_0000.nii.gz", "a 4D image")
    only("labelsTr/grid.nii.gz", "geometry differs from its image: spacing (1.5, 1.5, 2.5) vs (1.5, 1.5, 3.0)")
    only("labelsTr/values.nii.gz", "label values [20] are not in dataset.json")
    only("labelsTr/empty.nii.gz", "empty label map")
    only("imagesTr/mr_0000.nii.gz", "not CT")
    only("imagesTr/nan_0000.nrrd", "NaN")
    only("imagesTr/blank_0000.nii.gz", "constant intensity -1000")
    only("imagesTr/wide_0000.nii.gz", "implausible voxel spacing (1.5, 1.5, 50.0)")
    only("imagesTr/nosuffix.nii.gz", "missing the _0000")
    only("labelsTr/orphan.nii.gz", "without an image")
    only("unlabeled/cut_0000.nii.gz", "truncated", fatal=False)  # read_image refuses it: pretraining skips it
    only("unlabeled/junk_0000.nii.gz", "will be skipped", fatal=False)
    only("unlabeled/notes.txt", "ignored", fatal=False)
    only("unlabeled/mr2_0000.nii.gz", "not CT", fatal=True)  # readable: nothing downstream would skip it
    only("dataset.json", "numTraining is 3 but imagesTr/labelsTr hold 13")
    assert "ok_0000.nii.gz" not in str(found) and "fine_0000" not in str(found)
    assert len(problems) == 18


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_found_although_itk_reads_it(tmp_path, suffix):
    path = _save(sitk.GetImageFromArray(np.arange(4000, dtype=np.int16).reshape(10, 20, 20)), tmp_path / f"a{suffix}")
    assert check.nifti_truncation(path) is None
    whole = path.read_bytes()
    for keep in (len(whole) // 3, len(whole) - 1):
        path.write_bytes(whole[:keep])
        sitk.ReadImage(str(path))  # no error from ITK: that is why the check exists
        assert "truncated" in check.nifti_truncation(path)
    if suffix == ".nii":
        assert len(whole) == 352 + 4000 * 2  # independent: NIfTI-1 header + vox_offset padding + int16 voxels
        path.write_bytes(whole + b"extra")
        assert check.nifti_truncation(path) is None


def test_geometry_mismatch_names_each_differing_field():
    image = _ct()
    label = _label(image)
    label.SetOrigin((0.0, 0.0, 5.0))
    label.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    (text,) = check.label_problems(label, set(FLARE22_LABELS.values()), image)
    assert "origin (0.0, 0.0, 5.0) vs (0.0, 0.0, 0.0)" in text and "direction" in text
    assert "size" not in text and "spacing" not in text
    assert check.label_problems(_label(image), {0, 1}, image) == []
    fractional = sitk.GetImageFromArray(np.full((4, 4, 4), 0.5, np.float32))
    assert any("not integers" in t for t in check.label_problems(fractional, {0, 1}))


@pytest.mark.parametrize("shift, scale, bad", [
    (0, 1, None),                      # CT in HU
    (1024, 1, "not CT"),               # stored without its rescale intercept: air at about 0
    (0, 1 / 4000, "not CT"),           # normalised to about [-0.25, 1]
    (0, 3, "not CT in HU"),            # air at -3000 and bone far above 4096
])
def test_ct_intensity_rules(shift, scale, bad):
    rng = np.random.default_rng(0)
    array = np.where(rng.random((20, 20, 20)) < 0.3, -1000.0, 40.0) + rng.normal(0, 10, (20, 20, 20))
    array[:, :2] = 2000.0  # some bone
    image = sitk.GetImageFromArray(((array + shift) * scale).astype(np.float32))
    problems = image_problems(image)
    assert problems == [] if bad is None else (len(problems) == 1 and problems[0].startswith(bad))


def test_padding_below_air_is_still_ct():
    array = sitk.GetArrayFromImage(_ct((10, 20, 20)))
    array[:, :, :3] = -3024
    assert image_problems(sitk.GetImageFromArray(array)) == []


def test_intensity_sample_is_bounded(monkeypatch):
    monkeypatch.setattr(check, "SAMPLE_VOXELS", 1000)
    array = np.zeros((40, 30, 20), np.int16)
    sample = check._sample(array)
    assert sample.size <= 1000 + 30 * 20 and sample.dtype == np.float32  # whole slices: at most one over
    assert sample.shape == (2, 30, 20)  # every 24th slice
    assert check._sample(np.zeros((3, 302, 302), np.int16)).shape == (1, 151, 151)  # big slices: every 2nd voxel


def test_oversized_header_is_refused_before_reading_pixels(tmp_path, monkeypatch):
    root = tmp_path / "data"
    image = _ct()
    _case(root, "big", image, _label(image))
    write_dataset_json(root, FLARE22_LABELS, 1)
    monkeypatch.setattr(io, "MAX_VOXELS", 100)

    def read_pixels(*args, **kwargs):
        raise AssertionError("pixels were read")

    monkeypatch.setattr(sitk, "ReadImage", read_pixels)
    problems = check_dataset(root)
    assert [p.file for p in problems] == ["imagesTr/big_0000.nii.gz", "labelsTr/big.nii.gz"]
    assert all("above the limit" in p.problem and p.fatal for p in problems)


def test_missing_folder_is_one_fatal_problem(tmp_path):
    assert check_dataset(tmp_path / "nope") == [Problem(str(tmp_path / "nope"), "no such dataset folder", True)]


def test_render_problems_lists_every_problem():
    problems = [Problem("imagesTr/a_0000.nii.gz", "not CT [weird]", True),
                Problem("unlabeled/b_0000.nii.gz", "could not read", False)]
    table = render_problems(problems)
    assert table.row_count == 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "2 problem(s), 1 fatal" in text and "not CT [weird]" in text
    assert "imagesTr/a_0000.nii.gz" in text and "no (skipped)" in text
