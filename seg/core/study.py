"""``seg study``: the paper's ablation as one command.

For each experiment and seed: pretrain (where the experiment has a pretraining stage), fine-tune from it,
predict the held-out test cases and evaluate them; then ``report.md`` with per-organ DSC/NSD tables (the
layout of the paper's Tables 3 and 4), training curves and overlays as PNG, the exact commands and the
resolved configurations. Every stage is resumable: rerunning the command finishes only what is missing.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import attrs

from seg.core.config import load_experiment
from seg.core.console import info
from seg.core.errors import DataError
from seg.core.io import write_text
from seg.core.evaluate import evaluate_folders
from seg.core.finetune import finetune
from seg.core.predict import predict_paths
from seg.core.pretrain import pretrain
from seg.core.checkpoint import load_checkpoint
from seg.core.train import LATEST


@attrs.frozen
class StudyRun:
    """One experiment at one seed: where its runs live and what it scored."""

    experiment: str
    seed: int
    folder: Path
    scores: dict  # organ name -> {"dsc": mean, "nsd": mean} over test cases
    pretrain: str | None = None  # the SSL task's name; None: no pretraining (the study's baseline)


def _finished(run: Path, epochs: int) -> bool:
    return (run / LATEST).exists() and load_checkpoint(run / LATEST)["epoch"] >= epochs


def _stage(function, run: Path, exp, epochs: int, **kwargs) -> None:
    """Run a training stage into ``run``: resume an interrupted one, skip a finished one."""
    if not (run / LATEST).exists():
        function(out=run, exp=exp, **kwargs)
    elif not _finished(run, epochs):
        function(out=run, exp=None, resume=True, **kwargs)


def held_out_cases(data: Path, test: Path | None) -> tuple[Path, Path]:
    """The test images and labels folders: ``TEST/imagesTr`` + ``TEST/labelsTr``, else ``DATA/imagesTs`` +
    ``DATA/labelsTs``."""
    if test is not None:
        images, labels = Path(test) / "imagesTr", Path(test) / "labelsTr"
    else:
        images, labels = Path(data) / "imagesTs", Path(data) / "labelsTs"
    if not images.is_dir() or not labels.is_dir():
        raise DataError(f"--test: no labeled test cases at {images} and {labels}; give --test DATASET")
    return images, labels


def run_one(name: str, seed: int, data: Path, out: Path, test: Path | None, overrides=(), device: str = "auto",
            workers: int = 1) -> StudyRun:
    """Pretrain (if any), fine-tune, predict and evaluate one experiment at one seed (test cases as in
    :func:`held_out_cases`)."""
    images, labels = held_out_cases(data, test)
    exp = load_experiment(name, (f"seed={seed}", *overrides))
    folder = Path(out) / exp.name / f"seed{seed}"
    common = {"data": data, "device": device, "workers": workers}
    init = None
    ssl = exp.pretrain.ssl.name if exp.pretrain is not None and exp.pretrain.epochs > 0 else None
    if ssl is not None:
        info(f"[bold]{name} seed {seed}: pretraining ({ssl})")
        init = folder / "pretrain"
        _stage(pretrain, init, exp, exp.pretrain.epochs, **common)
    info(f"[bold]{name} seed {seed}: fine-tuning")
    _stage(finetune, folder / "finetune", exp, exp.finetune.epochs, init=init, **common)
    predict_paths(images, folder / "pred", folder / "finetune", preview=True, device=device)
    report = evaluate_folders(folder / "pred", labels)
    report.write_csv(folder / "metrics.csv")
    report.write_json(folder / "metrics.json")
    return StudyRun(exp.name, seed, folder, report.mean_per_organ(), ssl)


def run_study(experiments: list[str], data: Path, out: Path, *, seeds=(0,), test: Path | None = None,
              overrides=(), device: str = "auto", workers: int = 1) -> Path:
    """Run every experiment at every seed, then write ``OUT/report.md``; returns its path."""
    out = Path(out)
    runs = [run_one(name, seed, Path(data), out, test, overrides, device, workers)
            for name in experiments for seed in seeds]
    write_text(json.dumps([attrs.asdict(r, value_serializer=_plain) for r in runs], indent=1), out / "runs.json")
    from seg.core.report import write_report

    command = shlex.join(["seg", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("seg") else None
    return write_report(runs, out, command=command)


def _plain(inst, field, value):
    return str(value) if isinstance(value, Path) else value
