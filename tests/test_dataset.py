"""The nnU-Net v2 layout: cases paired by name across formats and folders, dataset.json, prediction folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from seg.core.dataset import (FLARE22_LABELS, Case, list_images, open_dataset, scan_dataset,
                              write_dataset_json)
from seg.core.errors import DataError


def _write(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.full((4, 5, 6), value, np.int16))
    sitk.WriteImage(image, str(path))
    return path


def _json(root: Path, labels=None, num_training=None, **extra) -> None:
    meta = {"channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "liver": 1},
            "file_ending": ".nii.gz", **extra}
    if num_training is not None:
        meta["numTraining"] = num_training
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture
def layout(tmp_path, real_ct) -> Path:
    """Every kind of entry the layout accepts: several formats, a plain name, a grouping folder, DICOM."""
    root = tmp_path / "data"
    _json(root, num_training=2)
    _write(root / "imagesTr" / "a_0000.nii.gz")
    _write(root / "labelsTr" / "a.nii.gz")
    _write(root / "imagesTr" / "b_0000.nrrd")
    _write(root / "labelsTr" / "b.nrrd")
    _write(root / "imagesTs" / "c_0000.mha")
    _write(root / "labelsTs" / "c.nii.gz")
    _write(root / "imagesTs" / "d_0000.nii")
    _write(root / "unlabeled" / "u1_0000.nii.gz")
    _write(root / "unlabeled" / "u2.nii")
    _write(root / "unlabeled" / "batch2" / "u3_0000.nii.gz")
    (root / "unlabeled" / ".u4_0000.nii.gz.tmp.nii.gz").write_text("half-written")  # hidden: never a case
    os.symlink(real_ct / "example_ct_dicom", root / "unlabeled" / "series5")
    return root


def test_flare22_labels_match_the_challenge_order(real_ct):
    expected = ["background", "liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava",
                "right_adrenal_gland", "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum",
                "left_kidney"]
    assert FLARE22_LABELS == {name: value for value, name in enumerate(expected)}
    assert FLARE22_LABELS == json.loads((real_ct / "flare22_labels.json").read_text())["flare22"]


def test_open_dataset_pairs_cases_across_formats_and_folders(layout):
    ds = open_dataset(layout)
    assert [(c.name, c.image.name, c.label.name) for c in ds.training] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("b", "b_0000.nrrd", "b.nrrd")]
    assert [(c.name, c.label.name if c.label else None) for c in ds.test] == [("c", "c.nii.gz"), ("d", None)]
    assert [(c.name, c.image.relative_to(layout / "unlabeled").as_posix()) for c in ds.unlabeled] == [
        ("u3", "batch2/u3_0000.nii.gz"), ("series5", "series5"), ("u1", "u1_0000.nii.gz"), ("u2", "u2.nii")]
    assert all(c.label is None for c in ds.unlabeled)
    assert ds.labels == {"background": 0, "liver": 1}
    assert ds.num_classes == 2 and ds.organ_names == {1: "liver"}


def test_unlabeled_folder_name_is_configurable(layout):
    (layout / "unlabeled").rename(layout / "pool")
    assert open_dataset(layout).unlabeled == []
    assert len(open_dataset(layout, unlabeled_dir="pool").unlabeled) == 4


def test_other_label_sets_give_their_own_classes(tmp_path):
    _json(tmp_path, labels={"background": 0, "kidney": 1, "tumor": 3}, num_training=0)
    _write(tmp_path / "unlabeled" / "x_0000.nii.gz")
    ds = open_dataset(tmp_path)
    assert ds.num_classes == 4 and ds.organ_names == {1: "kidney", 3: "tumor"}


def test_nnunet_v1_label_mapping_is_accepted(tmp_path):
    _json(tmp_path, labels={"0": "background", "1": "liver", "2": "spleen"})
    _write(tmp_path / "unlabeled" / "x_0000.nii.gz")
    assert open_dataset(tmp_path).labels == {"background": 0, "liver": 1, "spleen": 2}


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "organ": [1, 2]}, "region"),
    ({"liver": 1}, "background"),
    ({"background": 0, "a": 1, "b": 1}, "share a value"),
    ({"background": 0, "a": 1.5}, "expected an integer"),
    ({"background": 0, "a": 300}, "expected an integer in 0..255"),
])
def test_bad_label_tables_are_refused_in_one_line(tmp_path, labels, message):
    _json(tmp_path, labels=labels)
    _write(tmp_path / "unlabeled" / "x_0000.nii.gz")
    with pytest.raises(DataError, match=message) as info:
        open_dataset(tmp_path)
    assert "dataset.json" in str(info.value) and "\n" not in str(info.value)


def test_not_a_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such dataset folder"):
        open_dataset(tmp_path / "missing")
    _write(tmp_path / "imagesTr" / "a_0000.nii.gz")
    with pytest.raises(DataError, match=r"not a dataset \(no dataset.json\)"):
        open_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        open_dataset(tmp_path)


def test_layout_problems_are_all_listed(tmp_path):
    _json(tmp_path, num_training=5)
    _write(tmp_path / "imagesTr" / "a_0000.nii.gz")                      # no label
    _write(tmp_path / "labelsTr" / "b.nii.gz")                           # no image
    _write(tmp_path / "imagesTr" / "c.nii.gz")                           # no _0000
    _write(tmp_path / "labelsTr" / "c.nii.gz")
    _write(tmp_path / "imagesTr" / "e_0000.nii.gz")
    _write(tmp_path / "imagesTr" / "e_0001.nii.gz")                      # second channel
    _write(tmp_path / "labelsTr" / "e.nii.gz")
    _write(tmp_path / "unlabeled" / "e_0000.nii.gz")                     # name taken by imagesTr
    (tmp_path / "imagesTr" / "notes.txt").write_text("hello")
    ds, problems = scan_dataset(tmp_path)
    found = {(p.file, p.fatal): p.problem for p in problems}
    assert "no label map" in found[("imagesTr/a_0000.nii.gz", True)]
    assert "without an image" in found[("labelsTr/b.nii.gz", True)]
    assert "_0000 channel suffix" in found[("imagesTr/c.nii.gz", True)]
    assert "second image channel" in found[("imagesTr/e_0001.nii.gz", True)]
    assert "also used by imagesTr/e_0000.nii.gz" in found[("unlabeled/e_0000.nii.gz", True)]
    assert "ignored" in found[("imagesTr/notes.txt", False)]
    assert "numTraining is 5" in found[("dataset.json", True)] and "2 labeled" in found[("dataset.json", True)]
    assert len(problems) == 7
    assert [c.name for c in ds.training] == ["c", "e"]
    with pytest.raises(DataError, match=r"imagesTr/c.nii.gz: missing the _0000 .* \(and 5 more; run `seg data check"):
        open_dataset(tmp_path)


def test_list_images_for_prediction(tmp_path, real_ct):
    _write(tmp_path / "p1_0000.nii.gz")
    _write(tmp_path / "plain.mha")
    _write(tmp_path / "scan_0001.nrrd")  # not a _0000 channel: the name stays whole
    (tmp_path / "README.md").write_text("not an image")
    os.symlink(real_ct / "example_ct_dicom", tmp_path / "dicom_series")
    cases = list_images(tmp_path)
    assert [(c.name, c.image.name) for c in cases] == [
        ("dicom_series", "dicom_series"), ("p1", "p1_0000.nii.gz"), ("plain", "plain.mha"),
        ("scan_0001", "scan_0001.nrrd")]
    assert all(isinstance(c, Case) and c.label is None for c in cases)
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "nope")


def test_write_dataset_json_round_trips_atomically(tmp_path):
    path = write_dataset_json(tmp_path, FLARE22_LABELS, 7, extra={"name": "x"})
    meta = json.loads(path.read_text())
    assert meta == {"channel_names": {"0": "CT"}, "labels": FLARE22_LABELS, "numTraining": 7,
                    "file_ending": ".nii.gz", "name": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]  # no temporary left behind
    with pytest.raises(DataError, match="background"):
        write_dataset_json(tmp_path, {"liver": 1}, 1)
    with pytest.raises(DataError, match="file_ending"):
        write_dataset_json(tmp_path, FLARE22_LABELS, 1, file_ending=".png")
    assert json.loads(path.read_text())["numTraining"] == 7  # a refused write leaves the old file whole
