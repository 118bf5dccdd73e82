"""Bad input, third part (issue #15): one line naming the file, package or folder, the exit code the README gives
(2 for a user error, 1 for a dataset that fails its checks), no traceback, and nothing left behind.

Cases tried (19; 119 in the reliability suite with ``test_bad_input.py`` and ``test_bad_input_more.py``):
 a .nii.gz with one corrupted byte in the middle (not truncated), through `seg predict` and `seg data prepare` (2);
 a label map on another grid than its image (shifted, and one slice short), through `seg data prepare` and
   `seg run finetune` (4);
 `seg predict --model` a pretraining run; `seg run finetune --resume` of a pretraining run (2);
 `--resume` with nothing to resume: no folder, an empty folder, for both stages (4);
 a new run into a folder that holds another run, of the other kind and of the same kind (2);
 two `seg predict` into one output folder at once; a second `seg run` (new, and --resume) into the folder of a
   run in progress: refused by the folder's lock, the first run unaffected (3);
 a missing package, a broken one (its import fails), and, as a bug rather than a user error, a module of seg's
   own that fails to import (traceback) (2 + 1 control).
Ctrl-C and kill -9 are in test_crashes.py, a full disk in test_full_disk.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from seg.core.checkpoint import load_checkpoint
from tests.reliability.conftest import (assert_one_line_error, listing, same_weights, seg_cli, snapshot,
                                        training_args)


def first(folder: Path, pattern: str = "*.nii.gz") -> Path:
    found = sorted(folder.glob(pattern))
    assert found, folder
    return found[0]


def corrupt_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seg", "-q", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended ({proc.returncode}) too early: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ---------------------------------------------------------------- a corrupted byte

def test_predict_refuses_a_gzip_with_a_corrupted_byte(smoke_run, synth_data, tmp_path):
    image = Path(shutil.copy(first(synth_data / "imagesTr"), tmp_path / "in_0000.nii.gz"))
    corrupt_middle_byte(image)
    out = tmp_path / "out.nii.gz"
    result = seg_cli("predict", "-i", image, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert_one_line_error(result, str(image), "corrupt", code=2)
    assert listing(tmp_path) == ["in_0000.nii.gz"]


def test_prepare_refuses_a_gzip_with_a_corrupted_byte(dataset_copy):
    image = first(dataset_copy / "imagesTr")
    corrupt_middle_byte(image)
    result = seg_cli("data", "prepare", dataset_copy, "-e", "smoke")
    assert_one_line_error(result, str(image), "corrupt", code=1)  # the dataset fails its checks
    assert not (dataset_copy / ".seg_cache").exists()


# ---------------------------------------------------------------- a label map on another grid

@pytest.mark.parametrize("how", ["shifted", "one_slice_short"])
def test_a_label_map_on_another_grid_is_refused_by_prepare_and_finetune(dataset_copy, tmp_path, how):
    label = first(dataset_copy / "labelsTr")
    original = sitk.ReadImage(str(label))
    if how == "shifted":
        moved = sitk.Image(original)
        moved.SetOrigin([o + 7.5 for o in original.GetOrigin()])
    else:
        size = list(original.GetSize())
        moved = sitk.RegionOfInterest(original, [size[0], size[1], size[2] - 1], [0, 0, 0])
    sitk.WriteImage(moved, str(label))
    out = tmp_path / "run"
    for args in (["data", "prepare", dataset_copy, "-e", "smoke"],
                 ["run", "finetune", "-e", "smoke", "--data", dataset_copy, "--out", out, "--device", "cpu"]):
        result = seg_cli(*args)
        assert_one_line_error(result, str(label), code=1)  # the dataset fails its checks
    assert not (dataset_copy / ".seg_cache").exists() and not out.exists()


# ---------------------------------------------------------------- the wrong kind of run

@pytest.fixture(scope="module")
def pretrain_run(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    result = seg_cli("run", "pretrain", "-e", "smoke", "--data", synth_data, "--out", out, "--epochs", "0",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


def test_predict_with_a_pretraining_run_as_model(pretrain_run, synth_data, tmp_path):
    before = snapshot(pretrain_run)
    result = seg_cli("predict", "-i", first(synth_data / "imagesTr"), "-o", tmp_path / "out", "--model", pretrain_run,
                     "--device", "cpu")
    assert_one_line_error(result, str(pretrain_run / "checkpoint_latest.pt"), "a pretrain checkpoint",
                          "needs a fine-tuning run", code=2)
    assert listing(tmp_path) == [] and snapshot(pretrain_run) == before


def test_finetune_resume_of_a_pretraining_run(pretrain_run, synth_data):
    before = snapshot(pretrain_run)
    result = seg_cli("run", "finetune", "--data", synth_data, "--out", pretrain_run, "--resume", "--device", "cpu")
    assert_one_line_error(result, str(pretrain_run / "checkpoint_latest.pt"), "a pretrain checkpoint", code=2)
    assert snapshot(pretrain_run) == before


# ---------------------------------------------------------------- --resume with nothing to resume

@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_with_nothing_to_resume(synth_data, tmp_path, stage, where):
    out = tmp_path / "runs" / "r"
    if where == "empty":
        out.mkdir(parents=True)
    result = seg_cli("run", stage, "--data", synth_data, "--out", out, "--resume", "--device", "cpu")
    assert_one_line_error(result, f"--out {out}: nothing to resume", code=2)
    assert listing(tmp_path) == ([] if where == "missing" else ["runs", "runs/r"])


# ---------------------------------------------------------------- a new run into a folder holding one

@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_new_run_into_a_folder_holding_another(smoke_run, synth_data, tmp_path, stage):
    held = Path(shutil.copytree(smoke_run, tmp_path / "held"))  # a fine-tuning run
    before = snapshot(held)
    result = seg_cli("run", stage, "-e", "smoke", "--data", synth_data, "--out", held, "--epochs", "0", "--device",
                     "cpu")
    assert_one_line_error(result, f"--out {held}: already holds a run", "--resume", code=2)
    assert snapshot(held) == before


# ---------------------------------------------------------------- two processes, one folder

def test_two_predicts_into_one_folder(smoke_run, predict_reference, tmp_path):
    inputs, reference = predict_reference
    out = tmp_path / "out"
    first_run = _start("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu")
    _wait_for(lambda: (out / ".seg.lock").exists(), first_run)
    os.kill(first_run.pid, signal.SIGSTOP)  # held mid-run (with its lock) while the second one tries
    try:
        second = seg_cli("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu")
    finally:
        os.kill(first_run.pid, signal.SIGCONT)
    assert_one_line_error(second, f"-o {out}: in use by another seg process", f"pid {first_run.pid}", code=2)
    assert first_run.wait(timeout=300) == 0, first_run.stderr.read()
    assert listing(out) == listing(reference)  # the first run's label maps alone, and the lock gone
    for name in listing(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    again = seg_cli("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert again.returncode == 0, again.stderr  # the lock went with its process


def test_a_second_run_into_a_run_in_progress(synth_data, reference_run, tmp_path):
    reference = reference_run("finetune")
    out = tmp_path / "run"
    first_run = _start(*training_args("finetune", synth_data), "--out", out)
    _wait_for(lambda: (out / "checkpoint_latest.pt").exists(), first_run)
    os.kill(first_run.pid, signal.SIGSTOP)  # held mid-run (with its lock) while the others try
    try:
        new = seg_cli(*training_args("finetune", synth_data), "--out", out)
        resumed = seg_cli("run", "finetune", "--data", synth_data, "--out", out, "--resume", "--device", "cpu")
    finally:
        os.kill(first_run.pid, signal.SIGCONT)
    assert_one_line_error(new, f"--out {out}: in use by another seg process", f"pid {first_run.pid}", code=2)
    assert_one_line_error(resumed, f"--out {out}: in use by another seg process", code=2)
    assert first_run.wait(timeout=300) == 0, first_run.stderr.read()
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt"):  # the first run went on as if alone
        assert same_weights(load_checkpoint(out / name)["model"], load_checkpoint(reference / name)["model"]), name
    assert ".seg.lock" not in listing(out)


# ---------------------------------------------------------------- missing or broken packages

def _seg_without(module: str, *args, pythonpath: Path | None = None):
    """``seg ARGS`` in a Python where importing ``module`` fails as if it were not installed."""
    code = f"import sys; sys.modules[{module!r}] = None; from seg.entry import main; main()"
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else None
    return subprocess.run([sys.executable, "-c", code, "-q", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_a_missing_package_is_one_line_naming_it(synth_data, tmp_path):
    labels = synth_data / "labelsTr"
    result = _seg_without("SimpleITK", "evaluate", "--pred", labels, "--gt", labels, "--out", tmp_path / "m.csv")
    assert_one_line_error(result, "cannot import SimpleITK", "pip install simpleitk", code=2)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("module, dist", [("click", "click"), ("rich", "rich"), ("pluggy", "pluggy"),
                                          ("torch", "torch")])
def test_a_package_the_command_line_itself_needs_is_one_line_naming_it(module, dist):
    result = _seg_without(module, "plugins")
    assert_one_line_error(result, f"cannot import {module}", f"pip install {dist}", code=2)


def test_a_broken_package_is_one_line_naming_it(synth_data, tmp_path):
    fake = tmp_path / "site" / "SimpleITK"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("libSimpleITK.so.2: cannot open shared object file: No such file or directory")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = seg_cli("data", "check", synth_data, env=env)
    assert_one_line_error(result, "cannot import SimpleITK", "libSimpleITK.so.2", "pip install simpleitk", code=2)


def test_seg_s_own_failing_import_is_a_bug_with_its_traceback(synth_data):
    result = _seg_without("seg.core.evaluate", "evaluate", "--pred", synth_data, "--gt", synth_data)
    assert result.returncode == 1 and "Traceback" in result.stderr and "seg.core.evaluate" in result.stderr
