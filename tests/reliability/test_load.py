"""Under load: predicting a folder of 30 cases keeps memory flat from the fifth case to the last.

The bound is set by what it must catch: a leak of one input volume per case. Each input is 48 x 256 x 256 int16
(6 MiB; a small body in a large field of view, so each case takes a third of a second), so such a leak grows the
process by 25 x 6 MiB = 150 MiB over cases 6-30; the bound is half of that (measured without a leak: about
3 MiB). ``test_a_leak_of_one_volume_per_case_breaks_the_bound`` runs the same prediction with exactly that leak
put in (every image read stays referenced) and shows the bound catches it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from seg.core import predict as predict_module
from seg.core.console import set_quiet
from seg.core.predict import predict_paths
from tests.reliability.conftest import write

CASES, WARM = 30, 5
SHAPE = (48, 256, 256)
VOLUME_MIB = SHAPE[0] * SHAPE[1] * SHAPE[2] * 2 / 2**20  # int16
BOUND_MIB = 0.5 * (CASES - WARM) * VOLUME_MIB


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _volume() -> np.ndarray:
    """A CT-like int16 volume of SHAPE: air with noise around a soft-tissue ellipse of 64 x 77 voxels."""
    z, y, x = np.indices(SHAPE)
    body = ((y - SHAPE[1] / 2) / 32) ** 2 + ((x - SHAPE[2] / 2) / 38.4) ** 2 < 1
    return (np.where(body, 40, -1000) + np.random.default_rng(0).normal(0, 10, SHAPE)).astype(np.int16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of CASES images (hard links to one volume: each is read anew)."""
    folder = tmp_path_factory.mktemp("load") / "in"
    source = folder.parent / "volume.nii.gz"
    write(_volume(), source, spacing=(1.5, 1.5, 5.0))
    folder.mkdir()
    for i in range(CASES):
        os.link(source, folder / f"case{i:02d}_0000.nii.gz")
    return folder


def _growth_mib(inputs: Path, run: Path, out: Path) -> float:
    """Resident memory gained from after the first WARM cases to after all CASES (MiB)."""
    set_quiet(True)
    warm = out.parent / "warm_in"
    warm.mkdir()
    for path in sorted(inputs.iterdir())[:WARM]:
        os.link(path, warm / path.name)
    assert predict_paths(warm, out, run, device="cpu")["done"] == WARM
    before = _rss_mib()
    summary = predict_paths(inputs, out, run, device="cpu")  # the first WARM are done: CASES - WARM more
    assert (summary["done"], summary["skipped"]) == (CASES - WARM, WARM)
    return _rss_mib() - before


def test_memory_stays_flat_over_thirty_cases(inputs, smoke_run, tmp_path):
    growth = _growth_mib(inputs, smoke_run, tmp_path / "out")
    assert growth < BOUND_MIB, (growth, BOUND_MIB)


def test_a_leak_of_one_volume_per_case_breaks_the_bound(inputs, smoke_run, tmp_path, monkeypatch):
    leaked = []

    def leaking_read(*args, **kwargs):
        image = read(*args, **kwargs)
        leaked.append(image)  # the deliberate leak: every input volume stays referenced
        return image

    read = predict_module.read_image
    monkeypatch.setattr(predict_module, "read_image", leaking_read)
    growth = _growth_mib(inputs, smoke_run, tmp_path / "out")
    assert len(leaked) == CASES
    assert growth >= BOUND_MIB, (growth, BOUND_MIB)
