"""Fixtures for the reliability suite: broken inputs built on the fly, a trained smoke run, the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch


def seg_cli(*args, cwd=None, env=None):
    """Run ``seg ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "seg", "-q", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def assert_one_line_error(result, *fragments, code: int | None = None, codes: tuple[int] | None = None):
    """Exit code ``code``, no traceback, one line on stderr that names each fragment.

    The README's rule, pinned per case: 2 for a user error, 1 for a check that found problems or a folder
    prediction with failed cases. ``codes=(c,)`` is the same as ``code=c`` (one code, never "1 or 2").
    """
    if codes is not None:
        assert code is None and len(codes) == 1, "pin exactly one exit code"
        code = codes[0]
    assert code in (1, 2), "pin the exit code the README gives for this case"
    assert result.returncode == code, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (relative, sorted; hidden ones included); [] when it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else []


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime_ns) of every file under ``folder``: equal snapshots mean nothing was added, removed or
    rewritten (an atomic rewrite gets a new inode)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
        if path.is_file():
            stat = path.stat()
            found[str(path.relative_to(folder))] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


def ct_volume(shape=(24, 40, 40), seed=0) -> np.ndarray:
    """A small CT-like int16 volume (z, y, x): air around a soft-tissue ellipse."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    vol = np.where(body, 40, -1000) + rng.normal(0, 10, shape)
    return vol.astype(np.int16)


def write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 3.0), like: sitk.Image | None = None) -> sitk.Image:
    """Write ``array`` (z, y, x) as an image; returns it."""
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def gigantic_nifti(path: Path) -> None:
    """A NIfTI-1 header claiming 30000^3 int16 voxels, followed by a few bytes of data."""
    header = bytearray(348)
    header[0:4] = np.int32(348).tobytes()
    header[40:56] = np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], np.int16).tobytes()
    header[70:72] = np.int16(4).tobytes()   # datatype int16
    header[72:74] = np.int16(16).tobytes()  # bitpix
    header[76:108] = np.array([1, 1, 1, 1, 1, 1, 1, 1], np.float32).tobytes()
    header[108:112] = np.float32(352).tobytes()  # vox_offset
    header[344:348] = b"n+1\0"
    with gzip.open(path, "wb") as fh:
        fh.write(bytes(header) + b"\0" * 4 + b"\0" * 64)


@pytest.fixture
def dataset_copy(synth_data, tmp_path) -> Path:
    """A private copy of the synthetic dataset, to break."""
    return Path(shutil.copytree(synth_data, tmp_path / "data", ignore=shutil.ignore_patterns(".seg_cache")))


# ---------------------------------------------------------------- uninterrupted references (crashes, full disk)

EPOCHS, STEPS = 3, 2


def training_args(stage: str, data: Path) -> list:
    """A smoke run of ``stage`` long enough to interrupt: EPOCHS epochs of STEPS steps on CPU."""
    return ["run", stage, "-e", "smoke", "--data", data, "--device", "cpu",
            "--set", f"{stage}.epochs={EPOCHS}", "--set", f"{stage}.steps_per_epoch={STEPS}"]


@pytest.fixture(scope="session")
def reference_run(synth_data, tmp_path_factory):
    """``reference_run(stage)``: the run folder of an uninterrupted ``training_args`` run (made once)."""
    runs = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp("reference") / stage
            result = seg_cli(*training_args(stage, synth_data), "--out", out)
            assert result.returncode == 0, result.stderr
            runs[stage] = out
        return runs[stage]

    return get


def same_weights(ours: dict, theirs: dict) -> bool:
    """Whether two state dicts hold the same tensors, bit for bit."""
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def same_history(run: Path, reference: Path) -> bool:
    """Whether two runs' metrics.json agree on every epoch's lr, loss and validation scores (timings differ)."""
    def scores(folder: Path) -> list[dict]:
        rows = json.loads((folder / "metrics.json").read_text())
        return [{k: v for k, v in row.items() if k in ("epoch", "lr", "loss") or k.startswith("val_")} for row in rows]

    return scores(run) == scores(reference)


def committed_entries(data: Path, cache_root: Path | None = None) -> list[Path]:
    """The committed cache entries (their JSON commit markers) of dataset DATA, in DATA/.seg_cache or under
    ``cache_root`` (SEG_CACHE_DIR)."""
    if cache_root is not None:
        return sorted(cache_root.glob("*/*/[!.]*.json"))
    return sorted((data / ".seg_cache").glob("*/[!.]*.json"))


@pytest.fixture(scope="session")
def prepared_reference(synth_data, tmp_path_factory) -> Path:
    """A copy of the synthetic dataset prepared by one uninterrupted ``seg data prepare -e smoke``."""
    data = Path(shutil.copytree(synth_data, tmp_path_factory.mktemp("prepared") / "data",
                                ignore=shutil.ignore_patterns(".seg_cache")))
    result = seg_cli("data", "prepare", data, "-e", "smoke")
    assert result.returncode == 0, result.stderr
    return data


def same_cache(cache_dir: Path, reference_dir: Path, data: Path, reference_data: Path) -> None:
    """Assert that ``cache_dir`` (of dataset ``data``) holds exactly the files of ``reference_dir`` (of
    ``reference_data``): arrays byte for byte, records equal but for the datasets' own paths."""
    ours, theirs = listing(cache_dir), listing(reference_dir)
    assert ours == theirs, (ours, theirs)
    for name in theirs:
        mine, ref = cache_dir / name, reference_dir / name
        if name.endswith(".npy"):
            assert mine.read_bytes() == ref.read_bytes(), name
        elif name.endswith(".json"):
            expected = ref.read_text().replace(json.dumps(str(reference_data))[1:-1], json.dumps(str(data))[1:-1])
            assert json.loads(mine.read_text()) == json.loads(expected), name


@pytest.fixture(scope="session")
def predict_reference(smoke_run, synth_data, tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of 8 input images, the label maps one uninterrupted ``seg predict`` wrote for them)."""
    root = tmp_path_factory.mktemp("predicted")
    inputs = root / "in"
    inputs.mkdir()
    for i, image in enumerate(sorted((synth_data / "imagesTr").glob("*.nii.gz")) * 2):
        shutil.copy(image, inputs / f"case{i:02d}_0000.nii.gz")
    result = seg_cli("predict", "-i", inputs, "-o", root / "out", "--model", smoke_run, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return inputs, root / "out"
