"""Interruptions lose nothing: kill -9 and Ctrl-C at an observed state, then the same command finishes the work
and its result equals an uninterrupted run's.

Each test watches the process until it reaches the state to interrupt (polling, never a timer), interrupts it,
asserts the state it interrupted, then resumes and compares:
- pretraining and fine-tuning killed (and fine-tuning Ctrl-C'd) with a checkpoint of 0 < epoch < last on disk:
  `--resume` ends with exactly the weights of an uninterrupted run, bit for bit (CPU, fixed seed);
- `seg data prepare` (one worker killed, two workers Ctrl-C'd) with some but not all cache entries committed:
  the committed entries load and are not redone, and the finished cache equals an uninterrupted one byte for byte;
- `seg predict` on a folder with some but not all label maps written: those are whole and not redone, and the
  finished folder equals an uninterrupted run's byte for byte, nothing hidden left behind.
Ctrl-C (SIGINT to the process group, as a terminal sends it) exits 130 with one line and no traceback. A full
disk is tests/reliability/test_full_disk.py.
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
import torch

from seg.core import cache as cache_module
from seg.core.checkpoint import load_checkpoint
from tests.reliability.conftest import (EPOCHS, committed_entries, listing, same_cache, same_history, same_weights,
                                        seg_cli, snapshot, training_args)


def _start(*args) -> subprocess.Popen:
    """``seg -q ARGS`` in its own process group (a terminal's Ctrl-C reaches the whole group), with SIGINT's
    default action as in a terminal: a shell's background job (``nohup pytest &``) inherits SIGINT ignored, and
    Python then never raises KeyboardInterrupt, so the Ctrl-C tests would test the launching shell."""
    return subprocess.Popen([sys.executable, "-m", "seg", "-q", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_when(proc: subprocess.Popen, reached, sig: int, timeout: float = 300.0):
    """Poll ``reached()`` until it is true, then send ``sig`` to the process group; returns the finished process's
    CompletedProcess-like (returncode, stderr)."""
    deadline = time.monotonic() + timeout
    while not reached():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before the state to interrupt: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the state to interrupt was never reached"
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def _check_interruption(result, sig: int) -> None:
    if sig == signal.SIGKILL:
        assert result.returncode == -signal.SIGKILL
    else:  # Ctrl-C: a clean exit, conventionally 130, one line saying how to continue
        assert result.returncode == 130, result.stderr
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("interrupted") and "--resume" in err, err


class _Epochs:
    """The epoch of RUN/checkpoint_latest.pt, read again only when the file was replaced."""

    def __init__(self, run: Path):
        self.path, self.seen, self.epoch = run / "checkpoint_latest.pt", None, -1

    def __call__(self) -> int:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return -1
        if (stat.st_ino, stat.st_mtime_ns) != self.seen:
            self.seen = (stat.st_ino, stat.st_mtime_ns)
            self.epoch = int(torch.load(self.path, map_location="cpu", weights_only=True)["epoch"])
        return self.epoch


KILL, CTRL_C = pytest.param(signal.SIGKILL, id="kill-9"), pytest.param(signal.SIGINT, id="ctrl-c")


@pytest.mark.parametrize("stage, sig", [("pretrain", signal.SIGKILL), ("finetune", signal.SIGKILL),
                                        ("finetune", signal.SIGINT)], ids=["pretrain-kill-9", "finetune-kill-9",
                                                                           "finetune-ctrl-c"])
def test_interrupted_training_resumes_exactly(stage, sig, synth_data, reference_run, tmp_path):
    reference = reference_run(stage)
    out = tmp_path / "run"
    epoch = _Epochs(out)
    result = _interrupt_when(_start(*training_args(stage, synth_data), "--out", out), lambda: epoch() >= 1, sig)
    _check_interruption(result, sig)
    stopped_at = load_checkpoint(out / "checkpoint_latest.pt")["epoch"]
    assert 0 < stopped_at < EPOCHS, stopped_at  # interrupted mid-run: there is something to resume and to do
    # kill -9 can land between an atomic write's temporary file and its rename: the temporary may stay, the file
    # it was replacing never changes half-way; the resume removes such leftovers (asserted below)
    assert all(".tmp" in p for p in listing(out) if p.startswith(".") and p != ".seg.lock"), listing(out)

    resumed = seg_cli("run", stage, "--data", synth_data, "--out", out, "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    names = ["checkpoint_latest.pt"] + (["checkpoint_best.pt"] if stage == "finetune" else [])
    for name in names:
        state = load_checkpoint(out / name)
        assert same_weights(state["model"], load_checkpoint(reference / name)["model"]), name
    assert load_checkpoint(out / "checkpoint_latest.pt")["epoch"] == EPOCHS
    assert same_history(out, reference)
    assert not [p for p in listing(out) if p.startswith(".")]


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 1), (signal.SIGINT, 2)], ids=["kill-9", "ctrl-c-2-workers"])
def test_interrupted_prepare_finishes_only_what_is_missing(sig, workers, synth_data, prepared_reference, tmp_path):
    data = Path(shutil.copytree(synth_data, tmp_path / "data", ignore=shutil.ignore_patterns(".seg_cache")))
    total = len(committed_entries(prepared_reference))
    result = _interrupt_when(_start("data", "prepare", data, "-e", "smoke", "--workers", workers),
                             lambda: len(committed_entries(data)) >= 1, sig)
    _check_interruption(result, sig)
    done = committed_entries(data)
    assert 0 < len(done) < total, (len(done), total)  # interrupted mid-way
    cache_dir = done[0].parent
    for entry in done:
        cache_module.load(cache_dir, entry.stem)  # every committed entry loads
    kept = {name: stat for name, stat in snapshot(cache_dir).items()
            if any(name.startswith(entry.stem + ".") for entry in done)}

    rerun = seg_cli("data", "prepare", data, "-e", "smoke")
    assert rerun.returncode == 0, rerun.stderr
    after = snapshot(cache_dir)
    assert {name: after.get(name) for name in kept} == kept  # the committed entries were not redone
    same_cache(cache_dir, committed_entries(prepared_reference)[0].parent, data, prepared_reference)


@pytest.mark.parametrize("sig", [KILL, CTRL_C])
def test_interrupted_predict_finishes_only_what_is_missing(sig, smoke_run, predict_reference, tmp_path):
    inputs, reference = predict_reference
    out = tmp_path / "out"

    def written() -> list[Path]:
        return sorted(out.glob("[!.]*.nii.gz"))

    result = _interrupt_when(_start("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu"),
                             lambda: len(written()) >= 1, sig)
    _check_interruption(result, sig)
    done = written()
    assert 0 < len(done) < len(list(inputs.iterdir())), len(done)  # interrupted mid-way
    for path in done:
        sitk.ReadImage(str(path))  # every visible output is whole
    kept = {name: stat for name, stat in snapshot(out).items() if not name.startswith(".")}

    rerun = seg_cli("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert rerun.returncode == 0, rerun.stderr
    after = snapshot(out)
    assert {name: after.get(name) for name in kept} == kept  # the finished cases were not redone
    assert listing(out) == listing(reference)  # nothing hidden left behind: no temporary file, no lock
    for name in listing(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name



def test_resume_removes_what_a_write_killed_mid_way_left(tmp_path):
    """kill -9 between an atomic write's temporary file and its rename leaves the temporary (named after the
    target); the next run holding the folder's lock removes such files and nothing else."""
    from seg.core.io import atomic_path, remove_stale_temporaries

    with atomic_path(tmp_path / "checkpoint_latest.pt", suffix=".pt") as tmp:
        tmp.write_bytes(b"half")
        leftover = tmp.with_name(tmp.name + "-copy.tmp.pt")
        leftover.write_bytes(b"half")  # what a killed writer would have left
    (tmp_path / ".seg.lock").write_text("")
    (tmp_path / ".hidden-user-file").write_text("keep")
    assert remove_stale_temporaries(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-user-file", ".seg.lock", "checkpoint_latest.pt"]
