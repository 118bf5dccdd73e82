"""``seg study``: the paper's ablation, and the label-budget study, as one command.

For each experiment and seed: pretrain (where the experiment has a pretraining stage), fine-tune from it,
predict the held-out test cases and evaluate them; then ``report.md`` (``seg.core.report``). Every stage is
resumable: rerunning the command finishes only what is missing and continues a partly trained run from its
latest checkpoint (the stage's ``--resume``).

Without ``labels`` every seed pretrains its own run and fine-tunes on every labeled case
(``OUT/EXP/seedS/{pretrain,finetune,pred}``). With ``labels`` (label budgets, e.g. 1, 2, 4, 8):

- each seed draws nested subsets of the labeled cases (:func:`label_subsets`: the 1-case set lies inside the
  2-case set, ...), and every experiment is fine-tuned on each (``finetune.cases``); with ``val_cases`` = K,
  every run of a seed validates on the same K cases kept out of every budget (:func:`validation_cases`;
  ``finetune.val_cases``), so a budget counts training cases; with 0, its train/validation split is drawn from
  the subset as from all cases, so a run sees no label outside its budget;
- every pretraining run is made once per experiment and pretraining seed (``pretrain_seeds``, default: the
  first seed) into ``OUT/EXP/pretrain-seedP`` and shared by all budgets and fine-tuning seeds
  (``OUT/EXP/pretrainP-seedS/labelsN``; without pretraining ``OUT/EXP/seedS/labelsN``);
- ``jobs`` > 1 runs that many training runs at a time in worker processes (``seg.core.jobs``), each
  fine-tuning run once the pretraining it starts from has finished;
- the report compares each pretrained experiment with the one without pretraining, budget by budget, on
  paired units (:func:`paired_differences`) with a bootstrap interval (:func:`bootstrap_interval`).
"""

from __future__ import annotations

import json
import shlex
import sys
from functools import partial
from pathlib import Path

import attrs
import numpy as np

from seg.core.checkpoint import load_checkpoint
from seg.core.config import Experiment, load_experiment, stage_differences
from seg.core.console import info
from seg.core.dataset import open_dataset
from seg.core.errors import ConfigError, DataError, SegError
from seg.core.evaluate import evaluate_folders
from seg.core.finetune import finetune
from seg.core.io import write_text
from seg.core.jobs import Task, run_in_order
from seg.core.predict import predict_paths
from seg.core.pretrain import pretrain
from seg.core.runs import CONFIG
from seg.core.train import LATEST

#: the numpy seed-sequence stream of the label subsets (kept apart from every other draw made with a seed)
SUBSET_STREAM = 14
RESAMPLES = 10_000


@attrs.frozen
class StudyRun:
    """One fine-tuning run of the study: where it lives, what it was trained on and what it scored."""

    experiment: str
    seed: int
    folder: Path
    scores: dict  # organ name -> {"dsc": mean, "nsd": mean} over test cases
    pretrain: str | None = None  # the SSL task's name; None: no pretraining (the study's baseline)
    labels: int | None = None  # the label budget; None: every labeled case
    pretrain_seed: int | None = None  # the seed of the pretraining run it started from
    cases: tuple[str, ...] = ()  # the labeled cases of its budget (empty: all)
    val_cases: tuple[str, ...] = ()  # validation cases kept out of every budget (empty: drawn from its cases)
    init: Path | None = None  # the pretraining run it started from


def _finished(run: Path, epochs: int) -> bool:
    return (run / LATEST).exists() and load_checkpoint(run / LATEST, mmap=True)["epoch"] >= epochs


def _stage(function, stage: str, run: Path, exp, epochs: int, **kwargs) -> None:
    """Run a training stage into ``run``: resume an interrupted one, skip a finished one, refuse one made with
    other settings (a changed experiment would otherwise keep its old runs unnoticed)."""
    if not (run / LATEST).exists():
        function(out=run, exp=exp, **kwargs)
        return
    changed = stage_differences(load_experiment(str(run / CONFIG)), exp, stage)
    if changed:
        raise ConfigError(f"{run}: made with other settings, {'; '.join(changed[:3])}"
                          f"{' ...' if len(changed) > 3 else ''}; give seg study another --out, or delete the run")
    if not _finished(run, epochs):
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


def experiment_overrides(name: str, overrides=()) -> tuple[str, ...]:
    """The ``--set`` overrides that apply to experiment ``name``: all of them, except that ``pretrain.*`` keys
    are left out for an experiment without pretraining (``pretrain = false``)."""
    own = tuple(o for o in overrides if not o.strip().startswith("pretrain."))
    if len(own) == len(overrides) or load_experiment(name, own).pretrain is not None:
        return tuple(overrides)
    return own


def resolve_experiments(names: list[str], overrides=()) -> list[Experiment]:
    """Every experiment of the study with its overrides (fails early on a bad name or override)."""
    return [load_experiment(name, experiment_overrides(name, overrides)) for name in names]


def _permutation(names: list[str], seed: int) -> list[str]:
    order = sorted(names)
    np.random.default_rng([SUBSET_STREAM, seed]).shuffle(order)
    return order


def label_subsets(names: list[str], budgets, seed: int) -> dict[int, list[str]]:
    """Nested subsets of the labeled case ``names``, one per budget: the first n of one permutation of the sorted
    names drawn with ``numpy.random.default_rng([SUBSET_STREAM, seed])``, each returned sorted."""
    order = _permutation(names, seed)
    return {n: sorted(order[:n]) for n in sorted(set(budgets))}


def validation_cases(names: list[str], seed: int, count: int) -> list[str]:
    """The ``count`` validation cases of ``seed``, kept out of every budget: the last ``count`` of the
    permutation :func:`label_subsets` takes its subsets from the front of (so with ``count`` cases set aside,
    budgets up to ``len(names) - count`` never reach them)."""
    return sorted(_permutation(names, seed)[len(names) - count:]) if count else []


def check_budgets(data: Path, exp: Experiment, budgets, val_cases: int = 0) -> list[str]:
    """The labeled case names of ``data``, after checking that every budget is a count it can fill besides the
    ``val_cases`` validation cases."""
    names = [c.name for c in open_dataset(data, unlabeled_dir=exp.unlabeled_dir).training]
    if val_cases >= len(names):
        raise SegError(f"--val-cases {val_cases}: expected fewer than the {len(names)} labeled cases of {data}")
    for n in budgets:
        if n < 1 or n > len(names) - val_cases:
            aside = f" besides {val_cases} validation case(s)" if val_cases else ""
            raise SegError(f"--labels {n}: expected a number of labeled cases from 1 to {len(names) - val_cases} "
                           f"(the labeled cases of {data}{aside})")
    return names


def _ssl(exp: Experiment) -> str | None:
    return exp.pretrain.ssl.name if exp.pretrain is not None and exp.pretrain.epochs > 0 else None


def _pretrained(exp: Experiment, folder: Path, data: Path, device: str, workers: int) -> Path:
    info(f"[bold]{exp.name} seed {exp.seed}: pretraining ({_ssl(exp)})")
    _stage(pretrain, "pretrain", folder, exp, exp.pretrain.epochs, data=data, device=device, workers=workers)
    return folder


def _finetuned(exp: Experiment, folder: Path, init: Path | None, test: tuple[Path, Path], data: Path, device: str,
               workers: int, **fields) -> StudyRun:
    """Fine-tune into ``folder/finetune``, predict and evaluate the test cases; the run's record."""
    budget = f", {len(exp.finetune.cases)} labeled case(s)" if exp.finetune.cases else ""
    info(f"[bold]{exp.name} seed {exp.seed}{budget}: fine-tuning")
    _stage(finetune, "finetune", folder / "finetune", exp, exp.finetune.epochs, init=init, data=data, device=device,
           workers=workers)
    predict_paths(test[0], folder / "pred", folder / "finetune", preview=True, device=device)
    report = evaluate_folders(folder / "pred", test[1])
    report.write_csv(folder / "metrics.csv")
    report.write_json(folder / "metrics.json")
    return StudyRun(exp.name, exp.seed, folder, report.mean_per_organ(), _ssl(exp), cases=tuple(exp.finetune.cases),
                    init=init, **fields)


def _pretrain_task(name: str, overrides: tuple, folder: Path, data: Path, device: str, workers: int) -> Path:
    return _pretrained(load_experiment(name, overrides), folder, data, device, workers)


def _finetune_task(name: str, overrides: tuple, folder: Path, init: Path | None, test: tuple[Path, Path], data: Path,
                   device: str, workers: int, fields: dict) -> StudyRun:
    return _finetuned(load_experiment(name, overrides), folder, init, test, data, device, workers, **fields)


def seed_tasks(name: str, seed: int, data: Path, out: Path, test: Path | None, overrides=(), device: str = "auto",
               workers: int = 1) -> list[Task]:
    """Pretrain (if any), fine-tune on every labeled case, predict and evaluate one experiment at one seed (test
    cases as in :func:`held_out_cases`): the tasks, the fine-tuning one last."""
    own = (f"seed={seed}", *experiment_overrides(name, overrides))
    folder = Path(out) / name / f"seed{seed}"
    tasks, init = [], None
    if _ssl(load_experiment(name, own)):
        init = folder / "pretrain"
        tasks.append(Task(init, partial(_pretrain_task, name, own, init, data, device, workers), label=str(init)))
    fields = {"pretrain_seed": seed if init else None}
    tasks.append(Task(folder, partial(_finetune_task, name, own, folder, init, held_out_cases(data, test), data, device,
                                      workers, fields), after=init, label=str(folder)))
    return tasks


def budget_tasks(name: str, seeds, budgets, pretrain_seeds, data: Path, out: Path, test: Path | None, overrides=(),
                 device: str = "auto", workers: int = 1, val_cases: int = 0) -> list[Task]:
    """Experiment ``name`` at every fine-tuning seed, pretraining seed (when it pretrains) and label budget,
    each pretraining run made once and shared (module doc): the tasks, each pretraining before its
    fine-tunings; they run pretraining first, then seed by seed (a study stopped early holds whole seeds)."""
    own = experiment_overrides(name, overrides)
    held_out = held_out_cases(data, test)
    base = load_experiment(name, own)
    names = check_budgets(data, base, budgets, val_cases)
    tasks = []
    for pseed in (pretrain_seeds if _ssl(base) else (None,)):
        init = None
        if pseed is not None:
            init = Path(out) / name / f"pretrain-seed{pseed}"
            tasks.append(Task(init, partial(_pretrain_task, name, (f"seed={pseed}", *own), init, data, device, workers),
                              label=str(init), order=(0,)))
        for seed in seeds:
            val = validation_cases(names, seed, val_cases)
            for n, cases in label_subsets(names, budgets, seed).items():
                exp = (f"seed={seed}", *own, f"finetune.cases={json.dumps(cases)}", f"finetune.val_cases={json.dumps(val)}")
                run = f"pretrain{pseed}-seed{seed}" if pseed is not None else f"seed{seed}"
                folder = Path(out) / name / run / f"labels{n}"
                fields = {"labels": n, "pretrain_seed": pseed, "val_cases": tuple(val)}
                tasks.append(Task(folder, partial(_finetune_task, name, exp, folder, init, held_out, data, device,
                                                  workers, fields), after=init, label=str(folder), order=(1, seed)))
    return tasks


def run_study(experiments: list[str], data: Path, out: Path, *, seeds=(0,), test: Path | None = None,
              overrides=(), device: str = "auto", workers: int = 1, labels=None, pretrain_seeds=None,
              val_cases: int = 0, jobs: int = 1) -> Path:
    """Run every experiment at every seed (and, with ``labels``, every label budget, validated on ``val_cases``
    cases per seed kept out of every budget, or within the budget when 0: module doc), ``jobs`` training runs
    at a time (``seg.core.jobs``), then write ``OUT/report.md``; returns its path."""
    out, data = Path(out), Path(data)
    held_out_cases(data, test)
    if labels:
        pretrain_seeds = tuple(pretrain_seeds or seeds[:1])
        tasks = [t for name in experiments
                 for t in budget_tasks(name, seeds, labels, pretrain_seeds, data, out, test, overrides, device, workers,
                                       val_cases)]
    else:
        tasks = [t for name in experiments for seed in seeds
                 for t in seed_tasks(name, seed, data, out, test, overrides, device, workers)]
    runs = [r for r in run_in_order(tasks, jobs) if isinstance(r, StudyRun)]
    write_text(json.dumps([attrs.asdict(r, value_serializer=_plain) for r in runs], indent=1), out / "runs.json")
    from seg.core.report import write_report

    command = shlex.join(["seg", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("seg") else None
    return write_report(runs, out, command=command)


def _plain(inst, field, value):
    return str(value) if isinstance(value, Path) else value


# ---- paired comparisons -----------------------------------------------------------------------------------


def bootstrap_interval(values, *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0):
    """(mean, low, high): the mean of ``values`` and its percentile bootstrap interval; the bounds are
    ``numpy.quantile`` (linear) of the resample means at ``(1 - level) / 2`` and ``(1 + level) / 2``, with
    ``rng = numpy.random.default_rng(seed)``.

    1-D ``values`` (independent units): resample ``values[rng.integers(0, n, size=(resamples, n))]``.
    2-D ``values`` (rows: runs, one per pretraining seed and fine-tuning seed; columns: test cases): rows and
    columns are resampled independently, ``rows = rng.integers(0, r, size=(resamples, r))`` and then
    ``cols = rng.integers(0, c, size=(resamples, c))``, each resample's mean being that of
    ``values[rows[k]][:, cols[k]]`` (the crossed, or "pigeonhole", bootstrap, Owen 2007). Both the seed (which
    cases get labeled) and the test case are random, and every seed is scored on the same cases, so the units
    of one row or one column are not independent: a bootstrap over units would narrow the interval by ignoring
    the seed-to-seed spread."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_interval: no values")
    rng = np.random.default_rng(seed)
    if values.ndim == 1:
        means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    else:
        (r, c), draws = values.shape, np.arange(resamples)[:, None]
        rows = np.bincount((rng.integers(0, r, size=(resamples, r)) + r * draws).ravel(), minlength=resamples * r)
        cols = np.bincount((rng.integers(0, c, size=(resamples, c)) + c * draws).ravel(), minlength=resamples * c)
        means = np.einsum("ki,ij,kj->k", rows.reshape(resamples, r), values, cols.reshape(resamples, c)) / (r * c)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def unit_table(values: dict[tuple, float]) -> np.ndarray:
    """``{(pretraining seed, seed, case): value}`` as the 2-D table :func:`bootstrap_interval` resamples: one
    row per (pretraining seed, seed), one column per case, both sorted. Every row must hold every case."""
    runs, cases = sorted({k[:2] for k in values}), sorted({k[2] for k in values})
    missing = [(*run, case) for run in runs for case in cases if (*run, case) not in values]
    if missing:
        raise SegError(f"scores.csv: no score for case {missing[0][2]} at pretraining seed {missing[0][0] or '-'}, "
                       f"seed {missing[0][1]}; every run must score the same test cases")
    return np.array([[values[(*run, case)] for case in cases] for run in runs], dtype=np.float64)


def verdict(low: float, high: float) -> str:
    """"helps" when the whole interval is above 0, "hurts" when it is below, else "no difference resolved"."""
    return "helps" if low > 0 else "hurts" if high < 0 else "no difference resolved"


def case_values(rows, organs=None, metric: str = "dsc") -> dict[tuple, float]:
    """Per run and test case, the score of ``organs`` (their mean; None: every organ, the case's mean score).

    ``rows``: dicts with experiment, pretrain_seed, seed, labels, case, organ and the metric (``scores.csv``).
    Keys: (experiment, pretrain_seed, seed, labels, case)."""
    wanted = None if organs is None else set(organs)
    sums: dict[tuple, list[float]] = {}
    for row in rows:
        if wanted is None or row["organ"] in wanted:
            key = tuple(str(row[k]) for k in ("experiment", "pretrain_seed", "seed", "labels", "case"))
            sums.setdefault(key, []).append(float(row[metric]))
    return {key: float(np.mean(v)) for key, v in sums.items()}


def paired_differences(rows, experiment: str, baseline: str, labels, organs=None, metric: str = "dsc"):
    """``experiment`` minus ``baseline`` on paired units: the same fine-tuning seed, label budget (hence subset)
    and test case; one unit per (pretraining seed, seed, case) of ``experiment``. Returns them as
    :func:`unit_table` lays them out (rows: pretraining seed and seed; columns: cases)."""
    values = case_values(rows, organs, metric)
    base = {(s, n, c): v for (e, _, s, n, c), v in values.items() if e == baseline}
    diffs = {}
    for (e, p, s, n, c), v in values.items():
        if e == experiment and n == str(labels):
            if (s, n, c) not in base:
                raise SegError(f"no {baseline} run scored case {c} at seed {s} with {n} labeled cases to pair with")
            diffs[(p, s, c)] = v - base[(s, n, c)]
    return unit_table(diffs) if diffs else np.zeros((0, 0))
