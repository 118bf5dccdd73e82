"""Under load: predicting a folder of 50 small cases keeps memory flat from the first case to the last."""

from __future__ import annotations

import shutil

import numpy as np

from seg.core.console import set_quiet
from seg.core.predict import predict_paths


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_fifty_cases_do_not_leak(smoke_run, synth_data, tmp_path):
    set_quiet(True)
    images = sorted((synth_data / "imagesTr").glob("*.nii.gz"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(50):
        shutil.copy(images[i % len(images)], inputs / f"case{i:02d}_0000.nii.gz")
    warm = tmp_path / "warm"
    warm.mkdir()
    for i in range(5):
        shutil.copy(inputs / f"case{i:02d}_0000.nii.gz", warm)
    predict_paths(warm, tmp_path / "out_warm", smoke_run, device="cpu")
    after_five = _rss_mib()
    summary = predict_paths(inputs, tmp_path / "out", smoke_run, device="cpu")
    after_fifty = _rss_mib()
    assert summary["done"] == 50
    assert after_fifty - after_five < 150, (after_five, after_fifty)  # MiB; a leak of ~1 volume/case would show
    assert np.isfinite(after_fifty)
