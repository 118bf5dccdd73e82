"""Bad input gets one clear line, a documented exit code, no traceback and nothing half-written.

Exit codes, pinned per case: 2 for a bad command line, option, name, configuration, input file or checkpoint; 1 for
a check that found problems (`seg data check`, and `data prepare` / `run` on a dataset that fails its checks) and
for `seg predict` on a folder where some cases failed (the rest are written).

Cases tried (54; ``test_bad_input_more.py`` tries 46 more and ``test_bad_input_runs.py`` 19: 119 in all). A case is
one bad input through one command; a refused run leaves nothing behind (no run folder, no cache, no output).
 data check (13): missing path, empty folder, truncated .nii.gz, text file as image, 2D image, 4D image, MR scan
   as CT, constant intensities, NaN intensities, label geometry differs from image, label values not in
   dataset.json, absurd spacing (0.0001 mm and 1e6 mm);
 data synth (1): output path is a file;
 run finetune (15): unknown backbone, unknown experiment, unknown --set key, --set value of the wrong type,
   malformed experiment TOML, missing dataset, empty dataset, dataset with no labeled case, dataset failing the
   check (bad label values), --out is a file, --init checkpoint of another width, --init truncated checkpoint,
   and (with `data prepare`, below) truncated image, absurd spacing, NaN intensities;
 run pretrain (2): dataset with no unlabeled scan, experiment without a pretraining stage;
 data prepare (5): missing path, truncated image, label values not in dataset.json, absurd spacing, NaN
   intensities;
 predict (16): missing input, empty file, truncated .nii.gz, text file, 2D image, 4D image, gigantic header,
   MR scan as CT, NaN intensities (.nrrd), constant intensities, absurd spacing,
   --model not a run folder, truncated checkpoints, checkpoint of another class count, output is a file, a folder
   with one truncated case (the others are written, exit 1);
 evaluate (2): missing folders, prediction geometry differs from ground truth.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import REAL_CT
from tests.reliability.conftest import (assert_one_line_error, ct_volume, gigantic_nifti, listing, seg_cli, snapshot,
                                        truncate, write)


def only(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern))


# ---------------------------------------------------------------- data check

def _break(data: Path, how: str) -> str:
    """Break one file of ``data``; return the file name the error must mention."""
    image = only(data / "imagesTr", "*_0000.nii.gz")[0]
    label = data / "labelsTr" / (image.name[: -len("_0000.nii.gz")] + ".nii.gz")
    if how == "truncated":
        truncate(image)
    elif how == "text":
        image.write_text("not an image")
    elif how == "2d":
        write(ct_volume((1, 40, 40))[0], image)
    elif how == "4d":
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(ct_volume()) for _ in range(2)]), str(image))
    elif how == "mr":
        shutil.copy(REAL_CT / "more" / "example_mr_sm.nii.gz", image)
    elif how == "constant":
        ref = sitk.ReadImage(str(image))
        write(np.zeros(sitk.GetArrayFromImage(ref).shape, np.int16), image, like=ref)
    elif how == "nan":
        ref = sitk.ReadImage(str(image))
        write(np.full(sitk.GetArrayFromImage(ref).shape, np.nan, np.float32), image, like=ref)
    elif how == "geometry":
        ref = sitk.ReadImage(str(label))
        ref.SetOrigin([o + 25.0 for o in ref.GetOrigin()])
        sitk.WriteImage(ref, str(label))
        return label.name
    elif how == "label_values":
        ref = sitk.ReadImage(str(label))
        arr = sitk.GetArrayFromImage(ref)
        arr[arr == 1] = 77
        write(arr, label, like=ref)
        return label.name
    elif how in ("spacing_tiny", "spacing_huge"):
        ref = sitk.ReadImage(str(image))
        ref.SetSpacing([1e-4 if how == "spacing_tiny" else 1e6] * 3)
        sitk.WriteImage(ref, str(image))
    return image.name


@pytest.mark.parametrize("how", ["truncated", "text", "2d", "4d", "mr", "constant", "nan", "geometry",
                                 "label_values", "spacing_tiny", "spacing_huge"])
def test_data_check_reports_the_file_and_exits_1(dataset_copy, how, request):
    if how == "mr":
        request.getfixturevalue("real_ct")
    name = _break(dataset_copy, how)
    before = snapshot(dataset_copy)
    result = seg_cli("data", "check", dataset_copy)
    assert result.returncode == 1, result.stderr
    assert name in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(dataset_copy) == before  # a check writes nothing


def test_data_check_missing_and_empty(tmp_path):
    assert_one_line_error(seg_cli("data", "check", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such", code=2)
    (tmp_path / "empty").mkdir()
    result = seg_cli("data", "check", tmp_path / "empty")  # the check runs and finds the folder is no dataset
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'empty'}: 2 problem(s)" in result.stderr and "no dataset.json" in result.stderr
    assert listing(tmp_path) == ["empty"]


def test_synth_into_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert_one_line_error(seg_cli("data", "synth", tmp_path / "f", "--labeled", "1", "--unlabeled", "0"),
                          f"{tmp_path / 'f'}: exists", code=2)
    assert listing(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("args, fragment", [
    (["--backbone", "vnett"], "unknown backbone 'vnett'"),
    (["-e", "nope"], "unknown experiment 'nope'"),
    (["--set", "finetune.epochs_=3"], "finetune.epochs_: unknown key"),
    (["--set", "finetune.epochs=x"], "expected int"),
])
def test_finetune_bad_names_and_keys(synth_data, tmp_path, args, fragment):
    result = seg_cli("run", "finetune", "--data", synth_data, "--out", tmp_path / "r", *args)
    assert_one_line_error(result, fragment, code=2)
    assert not (tmp_path / "r").exists()


def test_finetune_malformed_toml(synth_data, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[finetune\nepochs = 1\n")
    assert_one_line_error(seg_cli("run", "finetune", "--data", synth_data, "--out", tmp_path / "r", "-e", bad),
                          str(bad), "invalid TOML", code=2)
    assert listing(tmp_path) == ["bad.toml"]


def test_finetune_missing_empty_unlabeled_only_and_broken_datasets(dataset_copy, tmp_path):
    out = tmp_path / "r"
    assert_one_line_error(seg_cli("run", "finetune", "-e", "smoke", "--data", tmp_path / "nope", "--out", out),
                          f"{tmp_path / 'nope'}: no such dataset folder", code=2)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    assert_one_line_error(seg_cli("run", "finetune", "-e", "smoke", "--data", tmp_path / "empty", "--out", out),
                          str(tmp_path / "empty" / "dataset.json"), "no dataset.json", code=1)  # fails its checks
    assert not out.exists() and listing(tmp_path / "empty") == []
    only_unlabeled = Path(shutil.copytree(dataset_copy, tmp_path / "u"))
    for folder in ("imagesTr", "labelsTr"):
        for f in (only_unlabeled / folder).iterdir():
            f.unlink()
    meta = json.loads((only_unlabeled / "dataset.json").read_text())
    meta["numTraining"] = 0
    (only_unlabeled / "dataset.json").write_text(json.dumps(meta))
    assert_one_line_error(seg_cli("run", "finetune", "-e", "smoke", "--data", only_unlabeled, "--out", out),
                          f"{only_unlabeled}: no labeled case", code=2)
    assert not out.exists()
    name = _break(dataset_copy, "label_values")
    result = seg_cli("run", "finetune", "-e", "smoke", "--data", dataset_copy, "--out", out)
    assert_one_line_error(result, str(dataset_copy / "labelsTr" / name), "label values [77]", code=1)
    assert not out.exists()


def test_out_is_a_file(synth_data, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(seg_cli("run", "finetune", "-e", "smoke", "--data", synth_data, "--out", tmp_path / "file"),
                          f"--out {tmp_path / 'file'}: is a file", code=2)
    assert listing(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_init_with_bad_checkpoints(synth_data, smoke_run, tmp_path):
    base = ["run", "finetune", "-e", "smoke", "--data", synth_data, "--device", "cpu"]
    other = seg_cli(*base, "--set", "backbone.options.base_channels=2", "--out", tmp_path / "a", "--init", smoke_run)
    assert_one_line_error(other, str(smoke_run / "checkpoint_latest.pt"), "made with backbone", "base_channels=4",
                          code=2)
    cut = tmp_path / "cut.pt"
    shutil.copy(smoke_run / "checkpoint_latest.pt", cut)
    truncate(cut)
    assert_one_line_error(seg_cli(*base, "--out", tmp_path / "b", "--init", cut), str(cut), "truncated", code=2)
    assert listing(tmp_path) == ["cut.pt"]  # neither refused run left a folder


def test_pretrain_without_unlabeled_or_without_stage(dataset_copy, tmp_path):
    for f in (dataset_copy / "unlabeled").iterdir():
        f.unlink()
    assert_one_line_error(seg_cli("run", "pretrain", "-e", "smoke", "--data", dataset_copy, "--out", tmp_path / "p"),
                          f"{dataset_copy}: no unlabeled scan", code=2)
    assert_one_line_error(seg_cli("run", "pretrain", "-e", "flare22-scratch-vnet", "--data", dataset_copy, "--out",
                                  tmp_path / "q"), "'flare22-scratch-vnet' has no pretraining stage", code=2)
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


# ---------------------------------------------------------------- predict

@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "text", "2d", "4d", "gigantic", "mr", "nan",
                                 "constant", "spacing"])
def test_predict_bad_single_input(smoke_run, synth_data, tmp_path, how, request):
    src = tmp_path / ("in.nrrd" if how == "nan" else "in.nii.gz")
    if how == "mr":
        shutil.copy(request.getfixturevalue("real_ct") / "more" / "example_mr_sm.nii.gz", src)
    elif how == "nan":
        write(np.full((24, 40, 40), np.nan, np.float32), src)
    elif how == "constant":
        write(np.full((24, 40, 40), -1000, np.int16), src)
    elif how == "spacing":
        write(ct_volume(), src, spacing=(1e6, 1e6, 1e6))
    elif how == "empty":
        src.write_bytes(b"")
    elif how == "text":
        src.write_text("hello")
    elif how == "2d":
        write(ct_volume((1, 40, 40))[0], src)
    elif how == "4d":
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(ct_volume()) for _ in range(2)]), str(src))
    elif how == "truncated":
        shutil.copy(only(synth_data / "imagesTr", "*.nii.gz")[0], src)
        truncate(src)
    elif how == "gigantic":
        gigantic_nifti(src)
    out = tmp_path / "out.nii.gz"
    before = listing(tmp_path)
    result = seg_cli("predict", "-i", src, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert_one_line_error(result, str(src), code=2)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", ["truncated", "label_values", "spacing_huge", "nan"])
def test_prepare_and_finetune_refuse_broken_datasets(dataset_copy, tmp_path, how):
    name = _break(dataset_copy, how)
    broken = next(dataset_copy.rglob(name))
    for args in (["data", "prepare", dataset_copy, "-e", "smoke"],
                 ["run", "finetune", "-e", "smoke", "--data", dataset_copy, "--out", tmp_path / "r"]):
        result = seg_cli(*args)
        assert_one_line_error(result, str(broken), code=1)  # a dataset that fails its checks
    assert not (tmp_path / "r").exists()
    assert not (dataset_copy / ".seg_cache").exists()  # checked before anything is preprocessed


def test_prepare_missing_path(tmp_path):
    assert_one_line_error(seg_cli("data", "prepare", tmp_path / "nope", "-e", "smoke"),
                          f"{tmp_path / 'nope'}: no such dataset folder", code=2)
    assert listing(tmp_path) == []


def test_predict_bad_model_folders(smoke_run, synth_data, tmp_path):
    image = only(synth_data / "imagesTr", "*.nii.gz")[0]
    assert_one_line_error(seg_cli("predict", "-i", image, "-o", tmp_path / "o", "--model", tmp_path),
                          f"--model {tmp_path}: not a run folder", code=2)
    broken = Path(shutil.copytree(smoke_run, tmp_path / "broken"))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        truncate(broken / name)
    assert_one_line_error(seg_cli("predict", "-i", image, "-o", tmp_path / "o", "--model", broken),
                          str(broken / "checkpoint_best.pt"), "truncated", code=2)
    classes = Path(shutil.copytree(smoke_run, tmp_path / "classes"))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        state = torch.load(classes / name, weights_only=True)
        state["backbone"]["out_channels"] = 5
        torch.save(state, classes / name)
    assert_one_line_error(seg_cli("predict", "-i", image, "-o", tmp_path / "o", "--model", classes),
                          str(classes / "checkpoint_best.pt"), "does not fit", code=2)
    assert not (tmp_path / "o").exists()


def test_predict_output_is_a_file(smoke_run, synth_data, tmp_path):
    (tmp_path / "file").write_text("x")
    result = seg_cli("predict", "-i", synth_data / "imagesTr", "-o", tmp_path / "file", "--model", smoke_run)
    assert_one_line_error(result, f"-o {tmp_path / 'file'}: is a file", code=2)
    assert listing(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_predict_folder_with_one_bad_case_writes_the_others(smoke_run, synth_data, tmp_path):
    inputs = Path(shutil.copytree(synth_data / "imagesTr", tmp_path / "in"))
    bad = only(inputs, "*.nii.gz")[0]
    truncate(bad)
    result = seg_cli("predict", "-i", inputs, "-o", tmp_path / "out", "--model", smoke_run, "--device", "cpu")
    assert_one_line_error(result, "1 case(s) failed", str(bad), code=1)
    written = listing(tmp_path / "out")  # the others, and nothing hidden (no temporary file, no lock)
    assert written == sorted(p.name.replace("_0000", "") for p in only(inputs, "*.nii.gz") if p != bad)


# ---------------------------------------------------------------- evaluate

def test_evaluate_missing_and_mismatched(synth_data, tmp_path):
    assert_one_line_error(seg_cli("evaluate", "--pred", tmp_path / "p", "--gt", tmp_path / "g"),
                          f"--pred {tmp_path / 'p'}: no such folder", code=2)
    gt = Path(shutil.copytree(synth_data / "labelsTr", tmp_path / "gt"))
    pred = Path(shutil.copytree(gt, tmp_path / "pred"))
    moved = only(pred, "*.nii.gz")[0]
    image = sitk.ReadImage(str(moved))
    image.SetSpacing([s * 2 for s in image.GetSpacing()])
    sitk.WriteImage(image, str(moved))
    before = listing(tmp_path)
    result = seg_cli("evaluate", "--pred", pred, "--gt", gt, "--out", tmp_path / "m.csv")
    assert_one_line_error(result, str(moved), "its grid", code=2)
    assert listing(tmp_path) == before
