"""A full disk: one line naming the file that could not be written, exit 2, nothing half-written left, and the
same command finishes the work once there is space again.

Each test writes onto a real small filesystem: a tmpfs it mounts (which needs root; skipped with the reason
otherwise) and fills with a filler file to leave room for part of the work. Covered: `seg predict` into a
folder, `seg data prepare` into its cache, `seg run finetune` writing its checkpoints, `seg evaluate --out`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import SimpleITK as sitk

from seg.core import cache as cache_module
from seg.core.checkpoint import load_checkpoint
from tests.reliability.conftest import (EPOCHS, assert_one_line_error, committed_entries, listing, same_cache,
                                        same_weights, seg_cli, training_args)

NO_SPACE = "No space left on device"
PAGE = 4096


class SmallDisk:
    """A mounted tmpfs; ``leave(n)`` fills it to leave about ``n`` bytes, ``free()`` empties the filler."""

    def __init__(self, path: Path):
        self.path, self.filler = path, path / "filler"

    def leave(self, free_bytes: int) -> None:
        stat = os.statvfs(self.path)
        size = stat.f_bavail * stat.f_frsize - (free_bytes // PAGE) * PAGE
        with open(self.filler, "ab") as fh:
            fh.write(b"\0" * max(0, size))

    def free(self) -> None:
        self.filler.unlink()

    def contents(self) -> list[str]:
        return [name for name in listing(self.path) if name != "filler"]


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _size_on_disk(path: Path) -> int:
    return -(-path.stat().st_size // PAGE) * PAGE


def _no_temporaries(folder: Path) -> None:
    assert not [name for name in listing(folder) if Path(name).name.startswith(".")], listing(folder)


def test_predict_into_a_full_disk(small_disk, smoke_run, predict_reference):
    inputs, reference = predict_reference
    one = max(_size_on_disk(p) for p in reference.iterdir())
    out = small_disk.path / "out"
    small_disk.leave(int(2.5 * one))
    result = seg_cli("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu")
    assert_one_line_error(result, str(out) + "/", NO_SPACE, code=2)
    written = sorted(out.glob("*.nii.gz"))
    assert 0 < len(written) < len(list(inputs.iterdir()))
    for path in written:
        sitk.ReadImage(str(path))  # whole
    _no_temporaries(out)

    small_disk.free()
    assert seg_cli("predict", "-i", inputs, "-o", out, "--model", smoke_run, "--device", "cpu").returncode == 0
    assert listing(out) == listing(reference)
    for name in listing(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_prepare_into_a_full_disk(small_disk, synth_data, prepared_reference, tmp_path):
    data = Path(shutil.copytree(synth_data, tmp_path / "data", ignore=shutil.ignore_patterns(".seg_cache")))
    reference_dir = committed_entries(prepared_reference)[0].parent
    entry = max(sum(_size_on_disk(p) for p in reference_dir.glob(f"{e.stem}.*")) for e in reference_dir.glob("*.json"))
    env = {**os.environ, "SEG_CACHE_DIR": str(small_disk.path / "cache")}
    small_disk.leave(int(2.5 * entry))
    result = seg_cli("data", "prepare", data, "-e", "smoke", env=env)
    assert_one_line_error(result, str(small_disk.path / "cache"), NO_SPACE, code=2)
    done = committed_entries(data, small_disk.path / "cache")
    assert 0 < len(done) < len(list(reference_dir.glob("*.json")))
    cache_dir = done[0].parent
    named = set()
    for path in done:
        named.update(f for f in (cache_module.load(cache_dir, path.stem).record.get(k) for k in
                                 ("image_file", "label_file")) if f)
    assert {p.name for p in cache_dir.glob("*.npy")} == named  # no array outlives an uncommitted entry
    _no_temporaries(cache_dir)

    small_disk.free()
    assert seg_cli("data", "prepare", data, "-e", "smoke", env=env).returncode == 0
    same_cache(cache_dir, reference_dir, data, prepared_reference)


def test_checkpoint_into_a_full_disk(small_disk, synth_data, reference_run):
    reference = reference_run("finetune")
    checkpoint = _size_on_disk(reference / "checkpoint_latest.pt")
    out = small_disk.path / "run"
    small_disk.leave(int(1.5 * checkpoint) + 16 * PAGE)  # the first checkpoint fits, a second beside it does not
    result = seg_cli(*training_args("finetune", synth_data), "--out", out)
    assert_one_line_error(result, str(out) + "/", NO_SPACE, code=2)
    assert 0 <= load_checkpoint(out / "checkpoint_latest.pt")["epoch"] < EPOCHS  # the last good one stays
    _no_temporaries(out)

    small_disk.free()
    resumed = seg_cli("run", "finetune", "--data", synth_data, "--out", out, "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt"):
        assert same_weights(load_checkpoint(out / name)["model"], load_checkpoint(reference / name)["model"]), name


def test_evaluate_out_on_a_full_disk(small_disk, synth_data):
    out = small_disk.path / "metrics.csv"
    labels = synth_data / "labelsTr"
    small_disk.leave(0)
    result = seg_cli("evaluate", "--pred", labels, "--gt", labels, "--out", out)
    assert_one_line_error(result, str(small_disk.path) + "/metrics.", NO_SPACE, code=2)
    assert small_disk.contents() == []  # neither the CSV nor the JSON, no temporary file

    small_disk.free()
    assert seg_cli("evaluate", "--pred", labels, "--gt", labels, "--out", out).returncode == 0
    assert small_disk.contents() == ["metrics.csv", "metrics.json"]
