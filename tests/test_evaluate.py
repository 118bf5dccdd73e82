"""``evaluate_folders`` and ``EvaluationReport`` on tiny hand-made label folders written with SimpleITK."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from seg.core.errors import ConfigError, DataError
from seg.core.evaluate import SHORT_NAMES, evaluate_folders, flare22_value
from seg.core.metrics import FLARE22_TOLERANCES


def write(path, array, spacing=(1.0, 1.0, 2.0), direction=None):
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def two_organs():
    gt = np.zeros((6, 10, 12), np.uint8)  # z, y, x
    gt[1:5, 2:6, 2:6] = 1
    gt[2:4, 7:9, 8:10] = 2
    pred = np.zeros_like(gt)
    pred[1:5, 2:6, 3:7] = 1  # organ 1 moved one voxel (1 mm) along x; organ 2 missed
    return gt, pred


@pytest.fixture
def folders(tmp_path):
    gt, pred = two_organs()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumour": 2}}))
    for case in ("c1", "c2"):
        write(tmp_path / "gt" / f"{case}.nii.gz", gt)
    write(tmp_path / "pred" / "c1.nii.gz", pred)
    write(tmp_path / "pred" / "extra.nii.gz", pred)
    (tmp_path / "pred" / "c1.png").write_bytes(b"not an image")
    return tmp_path


def test_scores_csv_and_json(folders):
    gt, pred = two_organs()
    calls = []
    report = evaluate_folders(folders / "pred", folders / "gt", tolerances=1.0,
                              progress=lambda n, total=None: calls.append((n, total)))
    assert calls == [(0, 2), (1, None), (1, None)]
    assert report.labels == {1: "kidney", 2: "tumour"} and report.tolerances == {1: 1.0, 2: 1.0}
    assert report.missing == ["c2"] and report.unmatched == ["extra"]
    dsc_1 = 2 * np.sum((gt == 1) & (pred == 1)) / (np.sum(gt == 1) + np.sum(pred == 1))  # 2*48/128
    expected = {("c1", "kidney"): (dsc_1, 1.0),  # shifted 1 mm, tolerance 1 mm: every surfel within reach
                ("c1", "tumour"): (0.0, 0.0), ("c2", "kidney"): (0.0, 0.0), ("c2", "tumour"): (0.0, 0.0)}
    report.write_csv(folders / "out" / "m.csv")
    report.write_json(folders / "out" / "m.json")
    rows = list(csv.DictReader((folders / "out" / "m.csv").open()))
    assert [(r["case"], r["organ"], r["label"]) for r in rows] == [
        ("c1", "kidney", "1"), ("c1", "tumour", "2"), ("c2", "kidney", "1"), ("c2", "tumour", "2")]
    for r in rows:
        assert (float(r["dsc"]), float(r["nsd"])) == pytest.approx(expected[r["case"], r["organ"]], abs=1e-12)
    assert [r["note"] for r in rows] == ["", "", "missing prediction", "missing prediction"]
    saved = json.loads((folders / "out" / "m.json").read_text())
    assert saved["mean_per_organ"]["kidney"] == pytest.approx({"dsc": dsc_1 / 2, "nsd": 0.5})
    assert saved["mean_per_organ"]["tumour"] == {"dsc": 0.0, "nsd": 0.0}
    assert saved["mean"] == pytest.approx({"dsc": dsc_1 / 4, "nsd": 0.25})
    assert saved["missing_predictions"] == ["c2"] and saved["tolerance_mm"] == {"kidney": 1.0, "tumour": 1.0}
    assert len(saved["cases"]) == 4
    assert not [p for p in (folders / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_tolerance_below_the_shift_lowers_nsd(folders):
    report = evaluate_folders(folders / "pred", folders / "gt", tolerances={1: 0.5, 2: 3.0})
    kidney = next(r for r in report.rows if r["case"] == "c1" and r["label"] == 1)
    assert 0.0 < kidney["nsd"] < 1.0


def test_other_organs_need_a_tolerance(folders):
    with pytest.raises(ConfigError, match="'kidney'"):
        evaluate_folders(folders / "pred", folders / "gt")
    with pytest.raises(ConfigError, match="-1"):
        evaluate_folders(folders / "pred", folders / "gt", tolerances=-1.0)
    with pytest.raises(ConfigError, match=r"\[2\]"):
        evaluate_folders(folders / "pred", folders / "gt", tolerances={1: 2.0})


def test_flare22_defaults_and_nnunet_v1_dataset_json(tmp_path):
    gt, pred = two_organs()
    write(tmp_path / "gt" / "a.nii.gz", gt)
    write(tmp_path / "pred" / "a.nii.gz", pred)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert list(report.labels) == list(range(1, 14)) and report.tolerances == FLARE22_TOLERANCES
    assert {r["organ"]: (r["dsc"], r["nsd"]) for r in report.rows}["spleen"] == (1.0, 1.0)  # absent from both
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Right Kidney",
                                                                  "2": "inferior vena cava"}}))
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert report.labels == {1: "Right Kidney", 2: "inferior vena cava"}
    assert report.tolerances == {1: FLARE22_TOLERANCES[2], 2: FLARE22_TOLERANCES[6]}
    assert [c.header for c in report.table().columns] == ["Organ", "RK", "IVC", "Mean"]


def test_geometry_mismatch_names_the_prediction(tmp_path):
    gt, pred = two_organs()
    write(tmp_path / "gt" / "a.nii.gz", gt)
    write(tmp_path / "pred" / "a.nii.gz", pred, spacing=(1.0, 1.0, 2.5))
    with pytest.raises(DataError, match=r"pred/a\.nii\.gz.*differs"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tolerances=2.0)


def test_user_errors(tmp_path):
    with pytest.raises(DataError, match="--pred"):
        evaluate_folders(tmp_path / "nope", tmp_path)
    (tmp_path / "gt").mkdir()
    with pytest.raises(DataError, match="no label maps"):
        evaluate_folders(tmp_path, tmp_path / "gt")
    gt, _ = two_organs()
    write(tmp_path / "gt" / "a.nii.gz", gt)
    write(tmp_path / "pred" / "a.nii.gz", gt)
    write(tmp_path / "pred" / "a.nrrd", gt)
    with pytest.raises(DataError, match="second file for case 'a'"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")


def test_slice_rule_follows_the_body_axis_of_a_permuted_scan(tmp_path):
    """The same physical label maps stored axially and with index axes permuted score the same; the aorta
    false positive outside the ground truth's slices is ignored only along the body axis."""
    gt = np.zeros((10, 12, 14), np.uint8)
    gt[3:8, 4:7, 4:7] = 5
    gt[2:6, 2:5, 8:12] = 1
    pred = gt.copy()
    pred[0:2, 4:7, 4:7] = 5
    pred[2:6, 2:5, 9:13] = 1
    spacing = (0.8, 0.9, 2.5)  # x, y, z
    write(tmp_path / "gt" / "axial.nii.gz", gt, spacing)
    write(tmp_path / "pred" / "axial.nii.gz", pred, spacing)
    swap = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # index axis 0 runs along the body (z) axis
    write(tmp_path / "gt" / "permuted.nii.gz", gt.transpose(2, 1, 0), spacing[::-1], swap)
    write(tmp_path / "pred" / "permuted.nii.gz", pred.transpose(2, 1, 0), spacing[::-1], swap)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    scores = {(r["case"], r["label"]): (r["dsc"], r["nsd"]) for r in report.rows}
    assert scores["axial", 5] == (1.0, 1.0)
    for value in range(1, 14):
        assert scores["permuted", value] == pytest.approx(scores["axial", value], abs=1e-12)


def test_table_layout_like_the_paper(tmp_path):
    gt, pred = two_organs()
    for case in ("a", "b"):
        write(tmp_path / "gt" / f"{case}.nii.gz", gt)
    write(tmp_path / "pred" / "a.nii.gz", pred)
    write(tmp_path / "pred" / "b.nii.gz", gt)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    table = report.table()
    assert [c.header for c in table.columns] == ["Organ", *SHORT_NAMES.values(), "Mean"]
    assert list(table.columns[0].cells) == ["DSC(%)", "NSD(%)"]
    means = report.mean_per_organ()
    assert list(table.columns[1].cells) == [f"{100 * means['liver']['dsc']:.2f}", f"{100 * means['liver']['nsd']:.2f}"]
    assert list(table.columns[-1].cells)[0] == f"{100 * report.overall()['dsc']:.2f}"
    assert list(table.columns[2].cells) == ["50.00", "50.00"]  # right kidney: missed in a, perfect in b
    per_case = report.table(per_case=True)
    assert list(per_case.columns[0].cells) == ["a", "", "b", ""]
    assert list(per_case.columns[1].cells) == ["DSC(%)", "NSD(%)"] * 2
    assert list(per_case.columns[3].cells) == ["0.0", "0.0", "100.0", "100.0"]  # right kidney


def test_organ_names_map_to_flare22_values():
    assert flare22_value("inferior vena cava") == 6 and flare22_value("Aor.") == 5 and flare22_value("LK") == 13
    assert flare22_value("left_adrenal_gland") == 8 and flare22_value("kidney") is None


@pytest.fixture
def plates(tmp_path):
    """A liver as a 1-voxel-thick plate and its prediction one voxel (1 mm) off: DSC 0 and, by hand, NSD 1."""
    gt = np.zeros((6, 12, 12), np.uint8)
    gt[2, 2:10, 2:10] = 1
    pred = np.roll(gt, 1, axis=0)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    write(tmp_path / "gt" / "c.nii.gz", gt, spacing=(1.0, 1.0, 1.0))
    write(tmp_path / "pred" / "c.nii.gz", pred, spacing=(1.0, 1.0, 1.0))
    return tmp_path


def test_evaluation_rule_2022_by_default_and_2024_on_request(plates):
    default = evaluate_folders(plates / "pred", plates / "gt")
    assert default.rule == "2022" and [(r["dsc"], r["nsd"]) for r in default.rows] == [(0.0, 1.0)]
    later = evaluate_folders(plates / "pred", plates / "gt", rule="2024")
    assert [(r["dsc"], r["nsd"]) for r in later.rows] == [(0.0, 0.0)]
    assert json.loads(later.json_text())["rule"] == "2024"
    with pytest.raises(ConfigError, match="--rule 2023"):
        evaluate_folders(plates / "pred", plates / "gt", rule="2023")


def test_seg_evaluate_rule_option(plates):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "seg", "-q", "evaluate", "--pred", plates / "pred", "--gt",
                               plates / "gt", *args], capture_output=True, text=True)

    for args, rule, nsd in (([], "2022", 1.0), (["--rule", "2024"], "2024", 0.0), (["--rule", "2022"], "2022", 1.0)):
        result = run(*args, "--out", plates / f"m{rule}.csv")
        assert result.returncode == 0, result.stderr
        document = json.loads((plates / f"m{rule}.json").read_text())
        assert (document["rule"], document["cases"][0]["nsd"]) == (rule, nsd)
        assert list(csv.DictReader((plates / f"m{rule}.csv").open()))[0]["nsd"] == str(nsd)
    refused = run("--rule", "2023")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and "--rule" in refused.stderr


def test_csv_and_json_are_written_both_or_neither(folders, monkeypatch):
    """When the JSON cannot be written, the CSV is not left alone (nor a temporary file)."""
    report = evaluate_folders(folders / "pred", folders / "gt", tolerances=1.0)
    out = folders / "out"
    out.mkdir()

    def refuse(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(report), "json_text", refuse)
    with pytest.raises(OSError, match="m.json: cannot write"):
        report.write(out / "m.csv")
    assert list(out.iterdir()) == []
