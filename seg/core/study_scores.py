"""The study's scores as tables: every case's scores from the run folders, per-organ means per experiment,
the organ groups of the paper's finding, learning curves and the paired differences against the experiment
without pretraining, each with its bootstrap interval (``seg.core.study`` draws them). The report
(``seg.core.report``) and its figures (``seg.core.figures``) only present these numbers."""

from __future__ import annotations

import csv
import statistics

from seg.core.evaluate import SHORT_NAMES, flare22_value
from seg.core.study import bootstrap_interval, case_values, paired_differences, unit_table, verdict

ADRENALS = ("right_adrenal_gland", "left_adrenal_gland")
#: the small organs of the paper's finding, by FLARE22 label value
SMALL_ORGANS = {"adrenal glands": (7, 8), "gallbladder": (9,), "esophagus": (10,), "pancreas": (4,), "duodenum": (12,)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def experiment_names(runs) -> list[str]:
    """The runs' experiment names, each once, in the order of the runs."""
    return list(dict.fromkeys(r.experiment for r in runs))


def group_name(run) -> str:
    """What a run is averaged with: its experiment, and its label budget in a label-budget study."""
    return run.experiment if run.labels is None else f"{run.experiment} @ {run.labels}"


def label_budgets(runs) -> list:
    """The runs' label budgets, ascending (None, every labeled case, last)."""
    return sorted({r.labels for r in runs}, key=lambda n: float("inf") if n is None else n)


def overall_score(run, metric: str) -> float:
    """A run's ``metric`` (``"dsc"`` or ``"nsd"``) averaged over its organs."""
    return statistics.fmean(s[metric] for s in run.scores.values())


def adrenal_dsc(run) -> float:
    """A run's DSC averaged over the two adrenal glands."""
    return statistics.fmean(run.scores[o]["dsc"] for o in ADRENALS if o in run.scores)


def organ_table(runs, metric: str) -> tuple[list[str], dict[str, list[float]]]:
    """Organ names, and per experiment (and label budget) the per-organ score averaged over its runs, then
    their mean."""
    organs = list(runs[0].scores)
    table = {}
    for name in dict.fromkeys(map(group_name, runs)):
        mine = [r for r in runs if group_name(r) == name]
        row = [statistics.fmean(r.scores[o][metric] for r in mine) for o in organs]
        table[name] = row + [statistics.fmean(row)]
    return organs, table


def organ_heading(organ: str) -> str:
    """A table heading for an organ: its FLARE22 short name, else the name itself."""
    value = flare22_value(organ)
    return SHORT_NAMES[value] if value is not None else organ


def score_rows(runs) -> list[dict]:
    """Every run's per-case, per-organ scores: experiment, pretraining, pretrain_seed, seed, labels (budget or
    "all"), then the columns of the run's metrics.csv."""
    rows = []
    for run in runs:
        with open(run.folder / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                rows.append({"experiment": run.experiment, "pretraining": run.pretrain or "none",
                             "pretrain_seed": "" if run.pretrain_seed is None else run.pretrain_seed, "seed": run.seed,
                             "labels": run.labels or "all", **row})
    return rows


def organ_groups(rows) -> dict[str, list[str] | None]:
    """The organ groups compared: "mean" (every organ: None), "small organs", "adrenal glands", then each organ;
    a group none of whose organs is scored is left out."""
    organs = list(dict.fromkeys(r["organ"] for r in rows))
    small = [o for o in organs if any(flare22_value(o) in v for v in SMALL_ORGANS.values())]
    adrenal = [o for o in organs if flare22_value(o) in SMALL_ORGANS["adrenal glands"]]
    groups = {"mean": None, "small organs": small, "adrenal glands": adrenal}
    return {k: v for k, v in groups.items() if v is None or v} | {o: [o] for o in organs}


def learning_curve(rows, experiment: str, organs=None) -> dict:
    """Per label budget of ``experiment``: (mean, low, high) over its (pretraining seed, seed, test case) units of
    the case's mean DSC over ``organs`` (None: every organ), the interval resampling seeds and cases."""
    values = case_values(rows, organs)
    budgets = sorted({k[3] for k in values if k[0] == experiment}, key=budget_key)
    return {n: bootstrap_interval(unit_table({(p, s, c): v for (e, p, s, b, c), v in values.items()
                                              if e == experiment and b == n})) for n in budgets}


def budget_key(labels: str) -> float:
    """A ``labels`` column value as a number to sort and plot by (``"all"``: infinity)."""
    return float("inf") if labels == "all" else float(labels)


def paired_table(rows, runs) -> list[dict]:
    """Every pretrained experiment minus the first experiment without pretraining, per label budget and organ
    group (``organ_groups``): units, mean difference, 95 % bootstrap interval, verdict."""
    baselines = [r.experiment for r in runs if r.pretrain is None]
    if not baselines:
        return []
    table = []
    for name in experiment_names([r for r in runs if r.pretrain is not None]):
        for labels in label_budgets([r for r in runs if r.experiment == name]):
            for group, organs in organ_groups(rows).items():
                diffs = paired_differences(rows, name, baselines[0], labels or "all", organs)
                mean, low, high = bootstrap_interval(diffs)
                table.append({"experiment": name, "baseline": baselines[0], "labels": labels or "all", "organs": group,
                              "units": diffs.size, "difference": mean, "low": low, "high": high,
                              "verdict": verdict(low, high)})
    return table
