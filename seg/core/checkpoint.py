"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded with
``torch.load(weights_only=True)`` so a checkpoint can never run code."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from seg.core.errors import CheckpointError
from seg.core.io import atomic_path


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` atomically: the previous file stays intact until the new one is complete."""
    with atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint safely; a missing, truncated or code-carrying file is a one-line ``CheckpointError``.

    ``mmap``: map the file instead of reading it, so tensors never touched (a fine-tuning checkpoint's optimizer
    state, twice the model's size) cost no memory.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused to load (not plain weights: {reason[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a seg checkpoint (a {type(payload).__name__}, expected a dict)")
    return payload
