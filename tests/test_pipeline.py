"""The whole method on synthetic phantoms, through the CLI: pretrain -> finetune --init -> predict ->
evaluate with the `smoke` experiment; plus exact resume of fine-tuning after a kill, and --init checks."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from seg.core.checkpoint import load_checkpoint
from seg.core.errors import CheckpointError


def seg_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "seg", "-q", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):
    """A smoke pretraining and a fine-tuning initialised from it."""
    root = tmp_path_factory.mktemp("runs")
    seg_cli("run", "pretrain", "--ssl", "pcrl", "-e", "smoke", "--data", synth_data, "--out", root / "pre",
            "--device", "cpu")
    seg_cli("run", "finetune", "--backbone", "vnet", "-e", "smoke", "--data", synth_data, "--out", root / "ft",
            "--init", root / "pre", "--device", "cpu")
    return root


def test_run_folders_hold_everything_needed_to_reproduce(runs):
    for stage in ("pre", "ft"):
        folder = runs / stage
        for name in ("config.toml", "command.txt", "log.txt", "metrics.csv", "metrics.json", "checkpoint_latest.pt"):
            assert (folder / name).exists(), f"{stage}/{name}"
    assert (runs / "ft" / "checkpoint_best.pt").exists()
    assert "loaded" in (runs / "ft" / "log.txt").read_text()
    history = json.loads((runs / "ft" / "metrics.json").read_text())
    assert "val_mean_dice" in history[-1]


def test_predict_lands_on_the_input_grid_and_evaluate_scores_it(runs, synth_data, tmp_path):
    images = synth_data / "imagesTr"
    seg_cli("predict", "-i", images, "-o", tmp_path / "pred", "--model", runs / "ft", "--device", "cpu", "--preview",
            "--save-probabilities")
    for image_path in sorted(images.glob("*.nii.gz")):
        case = image_path.name.replace("_0000.nii.gz", "")
        pred = sitk.ReadImage(str(tmp_path / "pred" / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(image_path))
        assert pred.GetSize() == image.GetSize() and pred.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(pred.GetSpacing(), image.GetSpacing()) and np.allclose(pred.GetOrigin(), image.GetOrigin())
        assert np.allclose(pred.GetDirection(), image.GetDirection())
        assert (tmp_path / "pred" / f"{case}.png").exists() and (tmp_path / "pred" / f"{case}.npz").exists()
    result = seg_cli("evaluate", "--pred", tmp_path / "pred", "--gt", synth_data / "labelsTr", "--out",
                     tmp_path / "m.csv")
    assert "DSC" in result.stderr
    assert (tmp_path / "m.csv").exists() and (tmp_path / "m.json").exists()
    rerun = seg_cli("predict", "-i", images, "-o", tmp_path / "pred", "--model", runs / "ft", "--device", "cpu")
    assert rerun.returncode == 0


def test_init_from_another_width_is_a_clear_error(runs, synth_data, tmp_path):
    result = seg_cli("run", "finetune", "-e", "smoke", "--set", "backbone.options.base_channels=2", "--data",
                     synth_data, "--out", tmp_path / "ft", "--init", runs / "pre", "--device", "cpu", check=False)
    assert result.returncode == 2
    assert "made with backbone vnet(base_channels=4" in result.stderr and "this run uses" in result.stderr


AUGMENTED = ["finetune.class_share=0.5", "finetune.augment.rotation=[20.0, 5.0, 5.0]", "finetune.augment.scale=[0.8, 1.2]",
             "finetune.augment.spatial_prob=0.5", "finetune.augment.elastic_alpha=2.0", "finetune.augment.elastic_prob=0.3",
             "finetune.augment.gamma_prob=0.3", "finetune.augment.blur_prob=0.3", "finetune.augment.noise_std=0.1",
             "finetune.augment.flip_prob=0.3", "finetune.scheduler.name=\"cosine\"", "finetune.scheduler.warmup_epochs=2"]


def test_killed_finetune_resumes_to_the_same_weights(synth_data, tmp_path):
    """Exact resume with every augmentation, class-aware sampling, the prefetching loader and a warm-up
    schedule on: killed after epoch 2, resumed, the weights equal an uninterrupted run's bit for bit."""
    common = ["-e", "smoke", "--data", synth_data, "--device", "cpu", "--set", "finetune.epochs=6",
              "--set", "finetune.val_every=2", *[a for item in AUGMENTED for a in ("--set", item)]]
    seg_cli("run", "finetune", *common, "--out", tmp_path / "straight")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "seg", "-q", "run", "finetune", *map(str, common), "--out",
                             str(tmp_path / "killed")], env=env)
    latest = tmp_path / "killed" / "checkpoint_latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if load_checkpoint(latest)["epoch"] >= 2:
                break
        except CheckpointError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seg_cli("run", "finetune", "--resume", "--out", tmp_path / "killed", "--data", synth_data, "--device", "cpu")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_latest.pt")
    resumed = load_checkpoint(latest)
    assert resumed["epoch"] == straight["epoch"] == 6
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
