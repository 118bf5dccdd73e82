"""Organ statistics (``seg predict --statistics``) on a phantom of boxes whose volumes and intensities are
worked out by hand, and what ``seg predict`` prints per case and at the end of a folder."""

import csv
import json
import re
import time
import types

import numpy as np
import pytest
import SimpleITK as sitk

from seg.cli import main
from seg.core import predict
from seg.core.console import set_quiet
from seg.core.statistics import organ_statistics

ORGANS = {1: "liver", 2: "spleen", 3: "right_kidney"}
SPACING = (0.75, 0.5, 2.5)  # mm (x, y, z): 0.9375 mm^3 per voxel, exact in a NIfTI header's float32


def box_phantom(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    """(image, labels): int16 HU of size x 30, y 20, z 8 at SPACING; two boxes, no label 3.

    liver: z 1-4, y 2-11, x 3-17: 4 x 10 x 15 = 600 voxels, 40 and 60 HU in a checkerboard (even sides:
    300 of each), so 0.5625 ml, mean 50, min 40, max 60. spleen: z 5-6, y 14-16, x 20-23: 2 x 3 x 4 = 24 voxels
    of 100 HU but one of 130, so 0.0225 ml, mean (23 * 100 + 130) / 24 = 101.25, min 100, max 130.
    """
    hu = np.full((8, 20, 30), -1000, np.int16)
    labels = np.zeros(hu.shape, np.uint8)
    z, y, x = np.indices(hu.shape)
    liver = (slice(1, 5), slice(2, 12), slice(3, 18))
    hu[liver] = np.where((z + y + x)[liver] % 2 == 0, 40, 60)
    labels[liver] = 1
    spleen = (slice(5, 7), slice(14, 17), slice(20, 24))
    hu[spleen] = 100
    hu[5, 15, 21] = 130
    labels[spleen] = 2
    images = []
    for array in (hu, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetOrigin((-12.0, 30.0, 400.0))
        image.SetDirection(direction)
        images.append(image)
    return images


EXPECTED = {
    "liver": {"label": 1, "voxels": 600, "volume": 0.5625, "intensity": 50.0, "intensity_min": 40.0,
              "intensity_max": 60.0},
    "spleen": {"label": 2, "voxels": 24, "volume": 0.0225, "intensity": 101.25, "intensity_min": 100.0,
               "intensity_max": 130.0},
    "right_kidney": {"label": 3, "voxels": 0, "volume": 0.0, "intensity": None, "intensity_min": None,
                     "intensity_max": None},
}


def assert_expected(stats):
    assert list(stats) == ["liver", "spleen", "right_kidney"]
    for organ, expected in EXPECTED.items():
        for key, value in expected.items():
            assert stats[organ][key] == (value if value is None else pytest.approx(value, rel=1e-12)), (organ, key)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, -1, 0, 1, 0, 0, 0, 0, -1)])
def test_box_phantom_volumes_and_intensities_match_the_hand_computation(direction):
    image, labels = box_phantom(direction)
    assert_expected(organ_statistics(image, labels, ORGANS))


def test_label_map_of_another_size_is_refused():
    image, labels = box_phantom()
    with pytest.raises(Exception, match="does not match its image"):
        organ_statistics(image, labels[:, :, :4], ORGANS)


@pytest.fixture
def boxes_model(monkeypatch):
    """``seg predict`` with a stand-in model that 'segments' the box phantom exactly (0.05 s per case)."""
    _, truth = box_phantom()

    def segment(predictor, read, with_scores):
        image = read.pop()
        time.sleep(0.05)
        labels = sitk.Image(truth)
        labels.CopyInformation(image)
        return labels, None, []

    monkeypatch.setattr(predict, "load_predictor", lambda run, **options: types.SimpleNamespace(
        labels={"background": 0, **{name: value for value, name in ORGANS.items()}}))
    monkeypatch.setattr(predict, "_segment", segment)


def write_cases(folder, names, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = box_phantom(direction)
    for name in names:
        sitk.WriteImage(image, str(folder / f"{name}_0000.nii.gz"))
    return folder


def test_folder_statistics_json_and_csv(boxes_model, tmp_path):
    inputs = write_cases(tmp_path / "in", ["b", "a"], direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    out = tmp_path / "out"
    summary = predict.predict_paths(inputs, out, tmp_path, statistics=True, device="cpu")
    assert summary["done"] == 2
    for case in ("a", "b"):
        assert_expected(json.loads((out / f"{case}.json").read_text()))
    rows = list(csv.DictReader((out / "statistics.csv").open()))
    assert [(r["case"], r["organ"]) for r in rows] == [(c, o) for c in "ab" for o in EXPECTED]
    liver = rows[0]
    assert (liver["voxels"], float(liver["volume_ml"]), float(liver["intensity_mean_hu"]),
            liver["intensity_min_hu"], liver["intensity_max_hu"]) == ("600", 0.5625, 50.0, "40", "60")
    assert rows[2]["volume_ml"] == "0" and rows[2]["intensity_mean_hu"] == ""

    # a rerun with a new case and one statistics file gone: the skipped case gets its JSON from its label map
    write_cases(inputs, ["c"])
    (out / "a.json").unlink()
    summary = predict.predict_paths(inputs, out, tmp_path, statistics=True, device="cpu")
    assert (summary["done"], summary["skipped"]) == (1, 2)
    assert_expected(json.loads((out / "a.json").read_text()))
    assert [r["case"] for r in csv.DictReader((out / "statistics.csv").open())] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert not list(out.glob(".*"))


def test_single_image_statistics_beside_its_label_map_without_csv(boxes_model, tmp_path):
    inputs = write_cases(tmp_path / "in", ["a"])
    out = tmp_path / "pred" / "labels.nrrd"
    predict.predict_paths(inputs / "a_0000.nii.gz", out, tmp_path, statistics=True, preview=True, device="cpu")
    assert_expected(json.loads((tmp_path / "pred" / "labels.json").read_text()))
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkUInt8  # the preview went beside it, not over it
    assert (tmp_path / "pred" / "labels.png").exists()
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["labels.json", "labels.nrrd", "labels.png"]


def test_summary_counts_cases_and_times_them(boxes_model, tmp_path):
    inputs = write_cases(tmp_path / "in", ["a", "b", "c"])
    (inputs / "b_0000.nii.gz").write_bytes(b"not an image")
    summary = predict.predict_paths(inputs, tmp_path / "out", tmp_path, device="cpu")
    assert summary["done"] == 2 and len(summary["failed"]) == 1 and "b_0000.nii.gz" in summary["failed"][0]
    assert len(summary["seconds"]) == 2 and all(0.05 <= s < 5 for s in summary["seconds"])
    assert summary["total_seconds"] >= sum(summary["seconds"])
    line = predict.describe_summary(summary)
    assert re.fullmatch(r"predicted 2 case\(s\) in \d+\.\d s \(0\.\d s per case\), skipped 0 \(already done\), "
                        r"failed 1", line), line


def test_cli_prints_each_case_and_the_summary(boxes_model, tmp_path, capsys):
    inputs = write_cases(tmp_path / "in", ["a", "b", "c"])
    out = tmp_path / "out"

    def seg(*args):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "-i", str(inputs), "-o", str(out), "--model", str(tmp_path), *args])
            raise SystemExit(0)
        return exc.value.code or 0, capsys.readouterr().err

    try:
        code, err = seg("--statistics")
        assert code == 0
        assert [m.group(1) for m in re.finditer(r"^(\w): \d+\.\d s$", err, re.M)] == ["a", "b", "c"]
        assert re.search(r"predicted 3 case\(s\) in \d+\.\d s \(\d\.\d s per case\), skipped 0 \(already done\), "
                         r"failed 0", err), err
        assert (out / "statistics.csv").exists()
        (inputs / "d_0000.nii.gz").write_bytes(b"not an image")
        code, err = seg()
        assert code == 1
        assert re.search(r"^d: failed after \d+\.\d s$", err, re.M), err
        assert re.search(r"1 case\(s\) failed, the others were written \(predicted 0 case\(s\) in \d+\.\d s, "
                         r"skipped 3 \(already done\), failed 1\): .*d_0000\.nii\.gz", err.replace("\n", "")), err
    finally:
        set_quiet(False)


@pytest.fixture(scope="module")
def smoke_model(smoke_run):
    return smoke_run


def test_real_model_statistics_match_numpy_on_the_written_files(smoke_model, synth_data, tmp_path):
    images = sorted((synth_data / "imagesTr").glob("*.nii.gz"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).symlink_to(image)
    out = tmp_path / "out"
    predict.predict_paths(inputs, out, smoke_model, statistics=True, device="cpu")
    labels_json = json.loads((synth_data / "dataset.json").read_text())["labels"]
    for image_path in images:
        case = image_path.name.replace("_0000.nii.gz", "")
        image = sitk.ReadImage(str(image_path))
        hu = sitk.GetArrayFromImage(image).astype(np.float64)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        stats = json.loads((out / f"{case}.json").read_text())
        assert set(stats) == {name for name, value in labels_json.items() if value != 0}
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        for name, s in stats.items():
            mask = labels == labels_json[name]
            assert s["voxels"] == mask.sum() and s["volume"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-12)
            if mask.any():
                assert s["intensity"] == pytest.approx(hu[mask].mean(), rel=1e-9, abs=1e-9)
                assert (s["intensity_min"], s["intensity_max"]) == (hu[mask].min(), hu[mask].max())
            else:
                assert s["intensity"] is None
        assert sum(s["voxels"] for s in stats.values()) == np.count_nonzero(labels)
