"""More bad input (issue #8, the remaining gaps): one clear line, the exit code the README gives (2 for a user
error, 1 for a dataset that fails its checks), no traceback, nothing left.

Same rules as ``test_bad_input.py`` (54 cases); this file tries 46 more (119 in all with
``test_bad_input_runs.py``). "Unwritable" outputs are paths that really cannot be written even by root (the tests
run as root, where permission bits block nothing): a path under a regular file, or under /proc.

Cases tried (46):
 data check (1): a path with [brackets] is named intact (not eaten as console markup);
 data synth (4): negative count, non-empty existing folder, output under a file, output under /proc;
 data prepare (8): empty folder, empty dataset (dataset.json but no image), 2D image, 4D image, unknown
   experiment, unknown --set key, malformed experiment TOML, unwritable cache (SEG_CACHE_DIR under a file);
 run pretrain (10): missing dataset, empty folder, empty dataset (each leaving no run folder behind), unknown
   --ssl plugin, unknown --set key, malformed experiment TOML, --out is a file, --out under a file, a truncated
   unlabeled scan in a dataset with no labeled case (skipped and named, the run proceeds), --resume from a
   truncated checkpoint;
 run finetune (1): --out under a file;
 predict (10): unknown inferer or overlap=1.5 in the run's config.toml (predict has no --set: the run's config is its
   experiment), malformed config.toml, weights of another backbone than the config names, --overlap 1.5,
   --overlap -0.1, output under a file (single image, folder of images), output under /proc, -o an existing
   folder for a single image (not an error: the label map goes inside it);
 evaluate (12): empty --pred folder, truncated prediction, text file as prediction, 2D prediction, 4D
   prediction, prediction label values not in dataset.json, --tolerance not a number, --tolerance negative,
   --out is a folder, --out under a file, --out under /proc; plus predictions missing for some cases (exit 0,
   a warning names them, they score 0 with a note in the CSV).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.reliability.conftest import (assert_one_line_error, ct_volume, listing, seg_cli, snapshot, truncate,
                                        write)

UNDER_PROC = Path("/proc/seg-test-cannot-exist")


def first(folder: Path, pattern: str = "*.nii.gz") -> Path:
    found = sorted(folder.glob(pattern))
    assert found, folder
    return found[0]


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "file"
    path.write_text("x")
    return path


def write_2d(path: Path) -> None:
    write(ct_volume((1, 40, 40))[0], path)


def write_4d(path: Path) -> None:
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(ct_volume()) for _ in range(2)]), str(path))


def no_labeled_case(data: Path) -> Path:
    """Remove every labeled case of a dataset copy (its dataset.json says so)."""
    for folder in ("imagesTr", "labelsTr"):
        shutil.rmtree(data / folder)
    meta = json.loads((data / "dataset.json").read_text())
    meta["numTraining"] = 0
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


# ---------------------------------------------------------------- data check, data synth

def test_check_names_a_path_with_brackets_intact(tmp_path):
    assert_one_line_error(seg_cli("data", "check", tmp_path / "no[pe]"), "no[pe]", code=2)


@pytest.mark.parametrize("how", ["negative", "not_empty", "under_file", "under_proc"])
def test_synth_refuses_bad_counts_and_outputs(tmp_path, how):
    out, fragment = tmp_path / "out", None
    args = ["--labeled", "1", "--unlabeled", "0"]
    if how == "negative":
        args, fragment = ["--labeled", "1", "--unlabeled", "-2"], "--unlabeled -2"
    elif how == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        fragment = str(out)
    elif how == "under_file":
        out = a_file(tmp_path) / "out"
    else:
        out = UNDER_PROC / "out"
    before = listing(tmp_path)
    assert_one_line_error(seg_cli("data", "synth", out, *args), fragment or str(out), code=2)
    assert listing(tmp_path) == before


# ---------------------------------------------------------------- data prepare

@pytest.mark.parametrize("how", ["empty_folder", "empty_dataset", "2d", "4d"])
def test_prepare_refuses_empty_and_non_3d_datasets(dataset_copy, how):
    data, name = dataset_copy, str(dataset_copy)
    if how == "empty_folder":
        shutil.rmtree(data)
        data.mkdir()
    elif how == "empty_dataset":
        no_labeled_case(data)
        shutil.rmtree(data / "unlabeled")
        fragment = "no images"
    else:
        image = first(data / "imagesTr")
        (write_2d if how == "2d" else write_4d)(image)
        name = str(image)
    result = seg_cli("data", "prepare", data, "-e", "smoke")
    assert_one_line_error(result, name, code=1)  # the dataset fails its checks
    if how == "empty_dataset":
        assert fragment in result.stderr
    if how in ("2d", "4d"):
        assert f"a {how.upper()} image" in result.stderr
    assert not (data / ".seg_cache").exists()


@pytest.mark.parametrize("args, fragments", [
    (["-e", "nope"], ["unknown experiment 'nope'"]),
    (["-e", "smoke", "--set", "preprocess_=[]"], ["preprocess_: unknown key"]),
    (["-e", "{bad}"], ["{bad}", "invalid TOML"]),
])
def test_prepare_refuses_bad_experiments(synth_data, tmp_path, args, fragments):
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiments.x\nseed = 1\n")
    before = snapshot(synth_data)
    result = seg_cli("data", "prepare", synth_data, *[a.replace("{bad}", str(bad)) for a in args])
    assert_one_line_error(result, *[f.replace("{bad}", str(bad)) for f in fragments], code=2)
    assert snapshot(synth_data) == before


def test_prepare_with_an_unwritable_cache(dataset_copy, tmp_path):
    cache = a_file(tmp_path) / "cache"
    env = {**os.environ, "SEG_CACHE_DIR": str(cache)}
    result = seg_cli("data", "prepare", dataset_copy, "-e", "smoke", env=env)
    assert_one_line_error(result, str(cache), "cannot create the preprocessing cache", "SEG_CACHE_DIR", code=2)
    assert not (dataset_copy / ".seg_cache").exists() and sorted(os.listdir(tmp_path)) == ["data", "file"]


# ---------------------------------------------------------------- run pretrain / finetune

@pytest.mark.parametrize("how, code", [("missing", 2), ("empty_folder", 1), ("empty_dataset", 1)])
def test_pretrain_refuses_missing_and_empty_datasets(dataset_copy, tmp_path, how, code):
    data = dataset_copy
    if how == "missing":
        data = tmp_path / "nope"
    elif how == "empty_folder":
        data = tmp_path / "empty"
        data.mkdir()
    else:
        no_labeled_case(data)
        shutil.rmtree(data / "unlabeled")
    out = tmp_path / "runs" / "p"
    result = seg_cli("run", "pretrain", "-e", "smoke", "--data", data, "--out", out, "--epochs", "0", "--device", "cpu")
    assert_one_line_error(result, str(data), code=code)  # a bad path; a folder that fails the dataset checks
    assert not (tmp_path / "runs").exists()  # the refused run leaves no folder behind, not even the parent it made


@pytest.mark.parametrize("args, fragments", [
    (["--ssl", "nope"], ["unknown SSL task 'nope'"]),
    (["--set", "pretrain.epochz=1"], ["pretrain.epochz: unknown key"]),
    (["-e", "{bad}"], ["{bad}", "invalid TOML"]),
])
def test_pretrain_refuses_bad_names_and_keys(synth_data, tmp_path, args, fragments):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[pretrain\n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    result = seg_cli("run", "pretrain", "-e", "smoke", "--data", synth_data, "--out", tmp_path / "p", "--epochs", "0",
                     *args)
    assert_one_line_error(result, *[f.replace("{bad}", str(bad)) for f in fragments], code=2)
    assert listing(tmp_path) == ["bad.toml"]


@pytest.mark.parametrize("stage, where, fragment", [
    ("pretrain", "file", "is a file"), ("pretrain", "under_file", "cannot write there"),
    ("finetune", "under_file", "cannot write there"),
])
def test_run_out_is_a_file_or_under_one(synth_data, tmp_path, stage, where, fragment):
    out = a_file(tmp_path) if where == "file" else a_file(tmp_path) / "run"
    result = seg_cli("run", stage, "-e", "smoke", "--data", synth_data, "--out", out, "--epochs", "0", "--device", "cpu")
    assert_one_line_error(result, f"--out {out}", fragment, code=2)
    assert (tmp_path / "file").read_text() == "x" and listing(tmp_path) == ["file"]


def test_pretrain_skips_a_truncated_unlabeled_scan_then_refuses_a_truncated_resume(dataset_copy, tmp_path):
    data = no_labeled_case(dataset_copy)  # pretraining needs no labeled case
    bad = first(data / "unlabeled")
    truncate(bad)
    out = tmp_path / "p"
    command = [sys.executable, "-m", "seg", "run", "pretrain", "-e", "smoke", "--data", str(data), "--out", str(out),
               "--epochs", "0", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped unreadable scan")]
    assert len(skipped) == 1 and bad.name in skipped[0] and "truncated" in skipped[0], result.stderr
    assert (out / "checkpoint_latest.pt").is_file() and bad.name in (out / "log.txt").read_text()

    truncate(out / "checkpoint_latest.pt")
    before = listing(out)
    result = seg_cli("run", "pretrain", "--data", data, "--out", out, "--resume", "--device", "cpu")
    assert_one_line_error(result, str(out / "checkpoint_latest.pt"), "truncated", code=2)
    assert listing(out) == before


# ---------------------------------------------------------------- predict

def _edit_config(run: Path, pattern: str, replacement: str) -> None:
    config = run / "config.toml"
    text, count = re.subn(pattern, replacement, config.read_text())
    assert count == 1, pattern  # the edit took: otherwise the test would test nothing
    config.write_text(text)


@pytest.mark.parametrize("how, fragments", [
    ("inferer", ["{run}/config.toml", "unknown inferer 'nope'"]),
    ("malformed", ["{run}/config.toml", "invalid TOML"]),
    ("overlap", ["{run}/config.toml", "overlap=1.5 must be in [0, 1)"]),
    ("backbone", ["{run}/checkpoint_best.pt", "made with backbone vnet", "this run uses unet3d"]),
])
def test_predict_refuses_a_run_folder_it_cannot_use(smoke_run, synth_data, tmp_path, how, fragments):
    run = Path(shutil.copytree(smoke_run, tmp_path / "run"))
    if how == "inferer":
        _edit_config(run, r'(\[predict\.inferer\]\nname = )"[a-z_]+"', r'\1"nope"')
    elif how == "overlap":
        _edit_config(run, r'overlap = 0\.5', 'overlap = 1.5')
    elif how == "malformed":
        with (run / "config.toml").open("a") as fh:
            fh.write("\n[predict\n")
    else:
        _edit_config(run, r'(\[backbone\]\nname = )"vnet"', r'\1"unet3d"')
    out = tmp_path / "out"
    result = seg_cli("predict", "-i", first(synth_data / "imagesTr"), "-o", out, "--model", run, "--device", "cpu")
    assert_one_line_error(result, *[f.replace("{run}", str(run)) for f in fragments], code=2)
    assert listing(tmp_path) == ["run"] + [f"run/{name}" for name in listing(run)]


@pytest.mark.parametrize("overlap", ["1.5", "-0.1"])
def test_predict_refuses_a_bad_overlap(smoke_run, synth_data, tmp_path, overlap):
    out = tmp_path / "o.nii.gz"
    result = seg_cli("predict", "-i", first(synth_data / "imagesTr"), "-o", out, "--model", smoke_run, "--overlap",
                     overlap)
    assert_one_line_error(result, f"--overlap {overlap}", "[0, 1)", code=2)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("how", ["single_under_file", "folder_under_file", "under_proc"])
def test_predict_into_an_unwritable_output(smoke_run, synth_data, tmp_path, how):
    source = first(synth_data / "imagesTr") if how != "folder_under_file" else synth_data / "imagesTr"
    out = UNDER_PROC / "o.nii.gz" if how == "under_proc" else a_file(tmp_path) / "sub" / "o.nii.gz"
    if how == "folder_under_file":
        out = out.parent
    before = listing(tmp_path)
    result = seg_cli("predict", "-i", source, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert_one_line_error(result, str(out), "cannot write", code=2)
    assert listing(tmp_path) == before


def test_predict_into_an_existing_folder_puts_the_label_map_inside(smoke_run, synth_data, tmp_path):
    image = first(synth_data / "imagesTr")
    result = seg_cli("predict", "-i", image, "-o", tmp_path, "--model", smoke_run, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert listing(tmp_path) == [image.name.replace("_0000.nii.gz", ".nii.gz")]


# ---------------------------------------------------------------- evaluate

@pytest.fixture
def gt_and_pred(synth_data, tmp_path) -> tuple[Path, Path]:
    """Ground truth (with its dataset.json beside it) and predictions equal to it, to break."""
    gt = Path(shutil.copytree(synth_data / "labelsTr", tmp_path / "gt"))
    shutil.copy(synth_data / "dataset.json", tmp_path / "dataset.json")
    return gt, Path(shutil.copytree(gt, tmp_path / "pred"))


def _evaluate(gt: Path, pred: Path, *args):
    return seg_cli("evaluate", "--pred", pred, "--gt", gt, *args)


@pytest.mark.parametrize("how", ["empty", "truncated", "text", "2d", "4d", "label_values"])
def test_evaluate_refuses_bad_predictions(gt_and_pred, tmp_path, how):
    gt, pred = gt_and_pred
    broken = first(pred)
    fragments = [str(broken)]
    if how == "empty":
        shutil.rmtree(pred)
        pred.mkdir()
        fragments = [f"--pred {pred}", "no label maps"]
    elif how == "truncated":
        truncate(broken)
        fragments.append("truncated")
    elif how == "text":
        broken.write_text("not an image")
        fragments.append("not a readable image")
    elif how == "2d":
        write(np.zeros((40, 40), np.uint8), broken)
        fragments.append("a 2D image")
    elif how == "4d":
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 40, 40), np.uint8))] * 2), str(broken))
        fragments.append("a 4D image")
    else:
        image = sitk.ReadImage(str(broken))
        array = sitk.GetArrayFromImage(image)
        array[array == 1] = 77
        write(array, broken, like=image)
        fragments += ["[77]", "dataset.json"]
    out = tmp_path / "m.csv"
    before = listing(tmp_path)
    assert_one_line_error(_evaluate(gt, pred, "--out", out), *fragments, code=2)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("value, fragment", [("abc", "'abc' is not a valid float"), ("-1", "--tolerance -1")])
def test_evaluate_refuses_a_bad_tolerance(gt_and_pred, tmp_path, value, fragment):
    before = listing(tmp_path)
    out = tmp_path / "m.csv"
    assert_one_line_error(_evaluate(*gt_and_pred, "--tolerance", value, "--out", out), "--tolerance", fragment, code=2)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("where, fragment", [("folder", "is a folder"), ("under_file", "cannot write there"),
                                             ("under_proc", "cannot write there")])
def test_evaluate_refuses_an_unwritable_out(gt_and_pred, tmp_path, where, fragment):
    out = {"folder": tmp_path / "gt", "under_file": a_file(tmp_path) / "m.csv", "under_proc": UNDER_PROC / "m.csv"}
    before = listing(tmp_path)
    result = _evaluate(*gt_and_pred, "--out", out[where])
    assert_one_line_error(result, f"--out {out[where]}", fragment, code=2)
    assert listing(tmp_path) == before


def test_evaluate_with_missing_predictions_says_so_and_scores_them_0(gt_and_pred, tmp_path):
    gt, pred = gt_and_pred
    gone = first(pred)
    gone.unlink()
    case = gone.name[: -len(".nii.gz")]
    result = _evaluate(gt, pred, "--out", tmp_path / "m.csv")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(rf"no prediction for 1 case\(s\), scored 0: {case}\b", result.stderr), result.stderr
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert {r["note"] for r in rows if r["case"] == case} == {"missing prediction"}
    assert json.loads((tmp_path / "m.json").read_text())["missing_predictions"] == [case]
