"""Crashes lose nothing: kill -9 at random moments, then resume or rerun.

- pretraining and fine-tuning killed at random moments (2 each): `--resume` ends with exactly the weights of an
  uninterrupted run (CPU, fixed seed);
- `seg data prepare` and `seg predict` on a folder killed mid-way: no corrupt cache entry or output, and a rerun
  finishes only what is missing;
- a full disk while writing a checkpoint: tests/test_train.py::test_failed_write_keeps_the_previous_checkpoint.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from seg.core.checkpoint import load_checkpoint
from tests.reliability.conftest import seg_cli

EPOCHS = 5


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seg", "-q", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _kill_after(proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_killed_training_resumes_exactly(stage, synth_data, tmp_path):
    args = ["run", stage, "-e", "smoke", "--data", synth_data, "--device", "cpu",
            "--set", f"{stage}.epochs={EPOCHS}", "--set", f"{stage}.steps_per_epoch=3"]
    assert seg_cli(*args, "--out", tmp_path / "straight").returncode == 0
    reference = load_checkpoint(tmp_path / "straight" / "checkpoint_latest.pt")["model"]
    rng = random.Random(0)
    for attempt in range(2):
        out = tmp_path / f"killed{attempt}"
        _kill_after(_start(*args, "--out", out), rng.uniform(2.0, 6.0))
        for _ in range(5):  # a kill may land again: keep resuming until the run completes
            resume = (out / "checkpoint_latest.pt").exists()
            extra = ["--resume"] if resume else []
            cmd = ["run", stage, "--data", synth_data, "--device", "cpu", "--out", out, *extra]
            result = seg_cli(*(cmd if resume else args + ["--out", out]))
            if result.returncode == 0:
                break
        state = load_checkpoint(out / "checkpoint_latest.pt")
        assert state["epoch"] == EPOCHS
        for key, value in reference.items():
            assert torch.equal(value, state["model"][key]), (attempt, key)


def test_killed_prepare_leaves_no_corrupt_entry(synth_data, tmp_path):
    data = Path(shutil.copytree(synth_data, tmp_path / "data", ignore=shutil.ignore_patterns(".seg_cache")))
    _kill_after(_start("data", "prepare", data, "-e", "smoke"), 3.0)
    cache = next((data / ".seg_cache").glob("*"), None)
    if cache is not None:
        from seg.core import cache as cache_module

        for entry in cache.glob("*.json"):
            cache_module.load(cache, entry.stem)  # every committed entry loads
    assert seg_cli("data", "prepare", data, "-e", "smoke").returncode == 0


def test_killed_predict_leaves_no_partial_output(synth_data, tmp_path, smoke_run):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, image in enumerate(sorted((synth_data / "imagesTr").glob("*.nii.gz")) * 3):
        shutil.copy(image, inputs / f"case{i:02d}_0000.nii.gz")
    out = tmp_path / "out"
    _kill_after(_start("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu"), 5.0)
    for path in out.glob("*.nii.gz") if out.exists() else []:
        sitk.ReadImage(str(path))  # every visible output is whole
    before = {p.name for p in out.glob("*.nii.gz")} if out.exists() else set()
    result = seg_cli("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert result.returncode == 0
    assert len(list(out.glob("*.nii.gz"))) == len(list(inputs.iterdir()))
    assert not list(out.glob(".*"))
    assert f"skipped {len(before)}" in result.stderr or not before
