"""Fixtures for the reliability suite: broken inputs built on the fly, a trained smoke run, the CLI."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def seg_cli(*args, cwd=None, env=None):
    """Run ``seg ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "seg", "-q", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def assert_one_line_error(result, *fragments, codes=(1, 2)):
    """Exit code 1 or 2, no traceback, one line on stderr that names each fragment."""
    assert result.returncode in codes, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


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


@pytest.fixture(scope="session")
def smoke_run(synth_data, tmp_path_factory) -> Path:
    """A fine-tuned smoke model (1 epoch) to predict with."""
    out = tmp_path_factory.mktemp("reliability") / "ft"
    result = seg_cli("run", "finetune", "-e", "smoke", "--data", synth_data, "--out", out, "--epochs", "1",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def dataset_copy(synth_data, tmp_path) -> Path:
    """A private copy of the synthetic dataset, to break."""
    return Path(shutil.copytree(synth_data, tmp_path / "data", ignore=shutil.ignore_patterns(".seg_cache")))
