"""What a training stage reads: the checked dataset, preprocessed once into the cache."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from seg.core import cache
from seg.core.check import check_dataset
from seg.core.config import Experiment
from seg.core.console import info
from seg.core.dataset import Dataset, open_dataset
from seg.core.errors import CheckFailed, DataError


def preprocess_steps(exp: Experiment) -> list[tuple[str, dict]]:
    """The experiment's preprocessing steps as (name, options) pairs."""
    return [(c.name, dict(c.options)) for c in exp.preprocess]


def checked_dataset(data: Path, exp: Experiment) -> Dataset:
    """Open ``data`` and refuse it if ``seg data check`` finds a fatal problem (non-fatal ones are listed)."""
    problems = check_dataset(data, unlabeled_dir=exp.unlabeled_dir)
    fatal = [p for p in problems if p.fatal]
    if fatal and fatal[0].file == str(data):
        raise DataError(f"{data}: {fatal[0].problem}")
    if fatal:
        raise CheckFailed(f"{Path(data) / fatal[0].file}: {fatal[0].problem} ({len(fatal)} problem(s) in {data}; "
                          f"`seg data check {data}` lists them all)")
    for problem in problems:
        info(f"[yellow]{escape(str(Path(data) / problem.file))}: {escape(problem.problem)}")
    return open_dataset(data, unlabeled_dir=exp.unlabeled_dir)


def _prepared(data: Path, exp: Experiment, cases, workers: int) -> list:
    steps = preprocess_steps(exp)
    cache_dir = cache.default_cache_dir(data, steps)
    skipped = cache.prepare(cases, cache_dir, steps, workers=workers)
    for case, error in skipped:
        info(f"[yellow]skipped unreadable scan {escape(str(error))}")  # the message starts with the file
    bad = {case.name for case, _ in skipped}
    return [cache.load(cache_dir, c.name) for c in cases if c.name not in bad]


def labeled_cases(data: Path, exp: Experiment, workers: int = 1):
    """The dataset and its labeled training cases, preprocessed (memory-mapped from the cache)."""
    dataset = checked_dataset(data, exp)
    if not dataset.training:
        raise DataError(f"{data}: no labeled case (labelsTr/ is empty); fine-tuning needs at least one")
    return dataset, _prepared(data, exp, dataset.training, workers)


def unlabeled_cases(data: Path, exp: Experiment, workers: int = 1):
    """The images pretraining learns from: the unlabeled folder, plus labeled images if the experiment asks."""
    dataset = checked_dataset(data, exp)
    cases = list(dataset.unlabeled)
    if exp.pretrain is not None and exp.pretrain.use_labeled_images:
        cases += list(dataset.training)  # same cache entries as fine-tuning; labels unused
    if not cases:
        raise DataError(f"{data}: no unlabeled scan in {exp.unlabeled_dir}/ (set pretrain.use_labeled_images = true "
                        "to pretrain on the labeled images)")
    return dataset, _prepared(data, exp, cases, workers)
