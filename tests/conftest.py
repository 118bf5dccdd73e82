"""Shared fixtures: real CT location, temporary plugins, a tiny synthetic dataset."""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path

import pytest
import torch

import seg

from seg.core import plugins

# One thread: tiny networks gain nothing from two, and lose 100x when another process holds a core.
# Subprocesses (the CLI tests) inherit it through the environment.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"


@pytest.fixture
def real_ct() -> Path:
    """The folder of real CT test data beside the checkout; skip when it is absent."""
    if not (REAL_CT / "example_ct.nii.gz").exists():
        pytest.skip(f"real CT test data not found at {REAL_CT}")
    return REAL_CT


@contextlib.contextmanager
def extra_plugin(name: str, **hooks):
    """Register a throwaway plugin module with the given hook functions, for the duration of a test."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, seg.hookimpl(function))
    pm = plugins.plugin_manager()
    pm.register(module, name=name)
    plugins._table.cache_clear()
    try:
        yield module
    finally:
        pm.unregister(name=name)
        plugins._table.cache_clear()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (4 labeled, 4 unlabeled phantoms), written once per test session."""
    from seg.core.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, labeled=4, unlabeled=4, seed=0)
    return root


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, synth_data) -> Path:
    """A `smoke` fine-tuning run of one epoch on ``synth_data``, trained once per test session."""
    from seg.core.config import load_experiment
    from seg.core.console import set_quiet
    from seg.core.finetune import finetune

    set_quiet(True)
    run = tmp_path_factory.mktemp("smoke-run") / "run"
    finetune(synth_data, run, load_experiment("smoke"), device="cpu", epochs=1)
    return run
