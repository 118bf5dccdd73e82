"""``seg study`` at smoke size end to end (every labeled case, and label budgets with shared pretraining), the
report's numbers checked against the runs' own files, and the paired bootstrap against independent computations."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

import seg.core.study as study_module
from seg.core.config import load_experiment
from seg.core.convergence import history_gain, history_noise, run_history
from seg.core.errors import ConfigError, SegError
from seg.core.finetune import training_and_validation
from seg.core.report import adrenal_verdict, seed_markdown
from seg.core.study import (StudyRun, bootstrap_interval, experiment_overrides, label_subsets, paired_differences,
                            resolve_experiments, run_study, validation_cases, verdict)
from seg.core.study_scores import organ_table
from seg.core.synth import write_synthetic_dataset
from seg.core.train import LATEST
from tests.reliability.conftest import assert_one_line_error, seg_cli


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """smoke (PCRL) and smoke-scratch at seed 0 on 3 labeled, 2 unlabeled and 1 test phantom."""
    root = tmp_path_factory.mktemp("study")
    write_synthetic_dataset(root / "data", 3, 2, seed=0, test=1)
    report = run_study(["smoke", "smoke-scratch"], root / "data", root / "out", seeds=(0,), device="cpu")
    return root / "out", report


def test_study_runs_every_stage_and_writes_a_self_contained_report(study):
    out, report = study
    assert report == out / "report.md"
    assert (out / "smoke/seed0/pretrain/checkpoint_latest.pt").exists()
    assert not (out / "smoke-scratch/seed0/pretrain").exists()
    for name in ("smoke", "smoke-scratch"):
        assert (out / name / "seed0/finetune/checkpoint_best.pt").exists()
        assert (out / name / "seed0/pred/synth_test_0000.nii.gz").exists()
        assert (out / "figures" / f"overlay_{name}.png").exists()
    text = report.read_text()
    for heading in ("## Dice similarity coefficient", "## Normalized surface Dice", "## Per run",
                    "## The paper's finding", "## Resolved configurations"):
        assert heading in text
    for link in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (out / link).is_file(), link  # every picture the report shows is in OUT


def test_report_plots_with_matplotlib(study):
    pytest.importorskip("matplotlib", reason="the plots are the optional seg[report] extra")
    out, report = study
    text = report.read_text()
    for name in ("curves.png", "organs_dsc.png"):
        assert (out / "figures" / name).stat().st_size > 1000 and f"(figures/{name})" in text


def test_report_numbers_are_the_evaluations_numbers(study):
    out, report = study
    with open(out / "smoke-scratch/seed0/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    liver = statistics.fmean(float(r["dsc"]) for r in rows if r["organ"] == "liver")
    mean = statistics.fmean(float(r["dsc"]) for r in rows)  # one test case: mean over organs
    line = next(l for l in report.read_text().splitlines() if l.startswith("| smoke-scratch |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(100 * liver, abs=0.051)
    assert float(cells[-1]) == pytest.approx(100 * mean, abs=0.051)
    with open(out / "scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    assert len(scores) == 2 * len(rows) and {r["experiment"] for r in scores} == {"smoke", "smoke-scratch"}


def test_a_rerun_trains_nothing_again(study):
    out, _ = study
    checkpoint = out / "smoke/seed0/finetune/checkpoint_latest.pt"
    before = checkpoint.stat().st_mtime_ns
    run_study(["smoke", "smoke-scratch"], out.parent / "data", out, seeds=(0,), device="cpu")
    assert checkpoint.stat().st_mtime_ns == before


def _run(name, seed, adrenal, pretrain="pcrl"):
    scores = {"liver": {"dsc": 0.9, "nsd": 0.8}, "right_adrenal_gland": {"dsc": adrenal, "nsd": 0.0},
              "left_adrenal_gland": {"dsc": adrenal, "nsd": 0.0}}
    return StudyRun(name, seed, Path("."), scores, pretrain)


@pytest.mark.parametrize("pretrained, verdict", [
    ((0.50, 0.52, 0.54), "**held**"),      # +0.22 against a spread of 0.02 + 0.02
    ((0.05, 0.07, 0.09), "**did not hold**"),
    ((0.25, 0.35, 0.45), "**not resolved**"),  # +0.05 against a spread of 0.10 + 0.02
])
def test_adrenal_verdict_compares_the_difference_with_the_seed_spread(pretrained, verdict):
    runs = [_run("scratch", s, a, None) for s, a in enumerate((0.28, 0.30, 0.32))]
    runs += [_run("pcrl", s, a) for s, a in enumerate(pretrained)]
    text = adrenal_verdict(runs)
    assert verdict in text and "`pcrl` vs `scratch`" in text
    assert f"{100 * statistics.fmean(pretrained):.1f} ± {100 * statistics.stdev(pretrained):.1f}" in text


def test_adrenal_verdict_says_when_no_run_found_the_adrenals():
    runs = [_run("scratch", 0, 0.0, None), _run("scratch", 1, 0.0, None), _run("pcrl", 0, 0.004), _run("pcrl", 1, 0.0)]
    assert "Not testable" in adrenal_verdict(runs)


def test_adrenal_verdict_needs_a_baseline_and_several_seeds():
    assert "not tested" in adrenal_verdict([_run("pcrl", 0, 0.5)])
    assert "one seed" in adrenal_verdict([_run("pcrl", 0, 0.5), _run("scratch", 0, 0.1, None)])


def test_organ_table_averages_over_seeds_then_organs():
    runs = [_run("a", 0, 0.2), _run("a", 1, 0.4)]
    organs, table = organ_table(runs, "dsc")
    assert organs == ["liver", "right_adrenal_gland", "left_adrenal_gland"]
    assert table["a"] == pytest.approx([0.9, 0.3, 0.3, 0.5])


def test_cli_refuses_bad_seeds_and_unknown_experiments(tmp_path):
    assert_one_line_error(seg_cli("study", "--experiments", "smoke", "--data", str(tmp_path), "--out",
                                  str(tmp_path / "o"), "--seeds", "0,x"), "--seeds", code=2)
    assert_one_line_error(seg_cli("study", "--experiments", "smoke,nope", "--data", str(tmp_path), "--out",
                                  str(tmp_path / "o")), "nope", code=2)
    assert not (tmp_path / "o").exists()


def test_study_without_test_cases_says_where_it_looked(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 2, 0, seed=0)
    result = seg_cli("study", "--experiments", "smoke-scratch", "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "o"))
    assert_one_line_error(result, "imagesTs", "--test", code=2)
    assert not (tmp_path / "o").exists()


# ---- label budgets: nested subsets, shared pretraining, paired bootstrap intervals, resume -------------------

# the probe too: pretrain.* reaches the experiments that pretrain only
BUDGET_SETTINGS = ("finetune.epochs=2", "finetune.val_every=2", "pretrain.probe_every=2", "pretrain.probe_steps=2")


@pytest.fixture(scope="module")
def budget_study(tmp_path_factory):
    """smoke (PCRL) and smoke-scratch at seeds 0 and 1 with 1 and 2 labeled cases of 3; one test phantom."""
    root = tmp_path_factory.mktemp("budgets")
    write_synthetic_dataset(root / "data", 3, 2, seed=0, test=1)
    report = run_study(["smoke", "smoke-scratch"], root / "data", root / "out", seeds=(0, 1), labels=(1, 2),
                       overrides=BUDGET_SETTINGS, device="cpu")
    return root / "out", report


def test_label_subsets_are_nested_deterministic_and_drawn_from_the_seed():
    names = [f"case{i:02d}" for i in range(10)]
    subsets = label_subsets(names, (8, 1, 4, 2), seed=3)
    assert list(subsets) == [1, 2, 4, 8]
    for small, large in zip([1, 2, 4], [2, 4, 8]):
        assert len(subsets[small]) == small and set(subsets[small]) < set(subsets[large])
    assert label_subsets(list(reversed(names)), (1, 2, 4, 8), seed=3) == subsets  # the input order does not matter
    assert len({tuple(label_subsets(names, (4,), seed=s)[4]) for s in range(6)}) > 1


def test_budget_study_fine_tunes_every_budget_on_nested_subsets_shared_by_the_experiments(budget_study):
    out, _ = budget_study
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 2 * 2 * 2 and {r["labels"] for r in runs} == {1, 2}
    for seed in (0, 1):
        cases = {(r["experiment"], r["labels"]): r["cases"] for r in runs if r["seed"] == seed}
        assert cases[("smoke", 1)] == cases[("smoke-scratch", 1)] and cases[("smoke", 2)] == cases[("smoke-scratch", 2)]
        assert len(cases[("smoke", 1)]) == 1 and set(cases[("smoke", 1)]) < set(cases[("smoke", 2)])
    for r in runs:  # the run trained on its subset only, its validation drawn from it
        config = (Path(r["folder"]) / "finetune" / "config.toml").read_text()
        assert f"cases = {json.dumps(r['cases'])}" in config
        log = (Path(r["folder"]) / "finetune" / "log.txt").read_text()
        told = next(line for line in log.splitlines() if "validating on" in line)
        assert set(told.split(": ")[-1].split(", ")) <= set(r["cases"])


def test_budget_study_pretrains_once_per_experiment_and_every_run_starts_from_it(budget_study):
    out, _ = budget_study
    assert sorted(p.name for p in (out / "smoke").iterdir()) == ["pretrain-seed0", "pretrain0-seed0", "pretrain0-seed1"]
    assert not any("pretrain" in p.name for p in (out / "smoke-scratch").rglob("*"))
    shared = out / "smoke" / "pretrain-seed0" / "checkpoint_latest.pt"
    for folder in (out / "smoke").glob("pretrain0-seed*/labels*"):
        assert f"--init {shared}: loaded" in (folder / "finetune" / "log.txt").read_text()
    for folder in (out / "smoke-scratch").glob("seed*/labels*"):
        assert "--init" not in (folder / "finetune" / "log.txt").read_text()
    runs = json.loads((out / "runs.json").read_text())
    assert {r["init"] for r in runs if r["experiment"] == "smoke"} == {str(shared.parent)}
    assert "probe_dice" in json.loads((shared.parent / "metrics.json").read_text())[-1]
    assert {r["init"] for r in runs if r["experiment"] == "smoke-scratch"} == {None}


def reference_interval(values, seed=0, resamples=10_000, level=0.95):
    """An independent percentile bootstrap: the same documented draws, means summed by hand, quantiles
    interpolated by hand."""
    values = [float(v) for v in values]
    n = len(values)
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n)).tolist()
    means = sorted(sum(values[i] for i in row) / n for row in rows)

    def quantile(q):
        position = q * (len(means) - 1)
        low = math.floor(position)
        high = min(low + 1, len(means) - 1)
        return means[low] + (means[high] - means[low]) * (position - low)

    return sum(values) / n, quantile((1 - level) / 2), quantile((1 + level) / 2)


def _table():
    """A fixed score table: 'pre' (one pretraining seed) and 'base' at seeds 0 and 1, budget 2, cases a-c, two
    organs; and a budget-4 row set that must not be paired with budget 2."""
    dsc = {  # (experiment, seed, case) -> (liver, pancreas)
        ("pre", 0, "a"): (0.90, 0.30), ("pre", 0, "b"): (0.80, 0.10), ("pre", 0, "c"): (0.70, 0.50),
        ("pre", 1, "a"): (0.85, 0.20), ("pre", 1, "b"): (0.75, 0.40), ("pre", 1, "c"): (0.95, 0.00),
        ("base", 0, "a"): (0.80, 0.20), ("base", 0, "b"): (0.70, 0.30), ("base", 0, "c"): (0.75, 0.10),
        ("base", 1, "a"): (0.60, 0.10), ("base", 1, "b"): (0.80, 0.20), ("base", 1, "c"): (0.90, 0.10),
    }
    rows = []
    for (experiment, seed, case), values in dsc.items():
        for organ, value in zip(("liver", "pancreas"), values):
            rows.append({"experiment": experiment, "pretrain_seed": 0 if experiment == "pre" else "", "seed": seed,
                         "labels": 2, "case": case, "organ": organ, "dsc": value})
            rows.append({**rows[-1], "labels": 4, "dsc": 1.0})
    return rows[::-1]  # order must not matter


def test_paired_differences_on_a_fixed_table_by_hand():
    rows = _table()
    # case means (liver + pancreas) / 2, pre minus base, units ordered (pretraining seed, seed, case):
    # seed 0: a 0.60-0.50, b 0.45-0.50, c 0.60-0.425; seed 1: a 0.525-0.35, b 0.575-0.50, c 0.475-0.50
    expect = [0.10, -0.05, 0.175, 0.175, 0.075, -0.025]
    np.testing.assert_allclose(paired_differences(rows, "pre", "base", 2), np.reshape(expect, (2, 3)), atol=1e-12)
    np.testing.assert_allclose(paired_differences(rows, "pre", "base", 2, ["pancreas"]),
                               [[0.10, -0.20, 0.40], [0.10, 0.20, -0.10]], atol=1e-12)
    np.testing.assert_allclose(paired_differences(rows, "pre", "base", 4), np.zeros((2, 3)), atol=1e-12)
    with pytest.raises(SegError, match="scores.csv: no score for case c at pretraining seed 0, seed 1"):
        paired_differences([r for r in rows if (r["experiment"], r["seed"], r["case"]) != ("pre", 1, "c")],
                           "pre", "base", 2)


def reference_crossed_interval(table, seed=0, resamples=10_000, level=0.95):
    """An independent crossed bootstrap: the documented draws (rows, then columns), every resample's mean summed
    by hand over its rows x columns, quantiles interpolated as ``reference_interval`` does."""
    table = [[float(v) for v in row] for row in table]
    r, c = len(table), len(table[0])
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, r, size=(resamples, r)).tolist(), rng.integers(0, c, size=(resamples, c)).tolist()
    means = [sum(table[i][j] for i in ri for j in cj) / (r * c) for ri, cj in zip(rows, cols)]
    mean = sum(map(sum, table)) / (r * c)
    ordered = sorted(means)

    def quantile(q):
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return mean, quantile((1 - level) / 2), quantile((1 + level) / 2)


def test_crossed_bootstrap_equals_an_independent_implementation_with_the_same_draws():
    table = paired_differences(_table(), "pre", "base", 2)
    got = bootstrap_interval(table)
    assert got == pytest.approx(reference_crossed_interval(table), abs=1e-12)
    assert got[0] == pytest.approx(0.075) and got[1] < 0.075 < got[2]
    assert bootstrap_interval(table, seed=3) == pytest.approx(reference_crossed_interval(table, seed=3), abs=1e-12)
    wide = [[0.1, 0.3, -0.2, 0.0, 0.05], [0.2, 0.25, 0.1, -0.1, 0.3], [-0.3, 0.0, 0.1, 0.2, 0.15]]
    assert bootstrap_interval(wide, resamples=2000) == pytest.approx(
        reference_crossed_interval(wide, resamples=2000), abs=1e-12)


def test_crossed_bootstrap_matches_the_exact_distribution_and_keeps_the_seed_spread():
    table = [[0.4, 0.1], [-0.2, 0.3]]  # 4 row draws x 4 column draws: 16 equally likely resamples, enumerated
    means = sorted(sum(table[i][j] for i in ri for j in cj) / 4
                   for ri in itertools.product(range(2), repeat=2) for cj in itertools.product(range(2), repeat=2))
    _, low, high = bootstrap_interval(table, resamples=40_000)
    assert means[0] <= low <= means[1] and means[-2] <= high <= means[-1]  # 2.5 % and 97.5 % of 16 outcomes
    # one seed's subset helps every case and the other's hurts every case: the units look like 8 independent
    # draws centred on 0, but with two seeds the effect is not resolved beyond "anywhere in [-1, 1]"
    seeds = [[1.0, 1.1, 0.9, 1.0], [-1.0, -0.9, -1.1, -1.0]]
    _, unit_low, unit_high = bootstrap_interval(np.ravel(seeds))
    _, low, high = bootstrap_interval(seeds)
    assert high - low > 1.3 * (unit_high - unit_low) and low < -0.9 and high > 0.9


def test_bootstrap_interval_equals_an_independent_implementation_with_the_same_draws():
    diffs = paired_differences(_table(), "pre", "base", 2).ravel()
    got = bootstrap_interval(diffs)
    assert got == pytest.approx(reference_interval(diffs), abs=1e-12)
    assert got[0] == pytest.approx(0.075) and got[1] < 0.075 < got[2]
    assert bootstrap_interval(diffs, seed=5) == pytest.approx(reference_interval(diffs, seed=5), abs=1e-12)
    assert bootstrap_interval(diffs, seed=5) != got


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    values = [0.3, -0.1, 0.05, 0.2]  # 4^4 = 256 equally likely resamples, enumerated
    means = sorted(sum(values[i] for i in idx) / 4 for idx in itertools.product(range(4), repeat=4))

    def exact(q):  # the q-quantile of the exact distribution (lower value)
        return means[math.ceil(q * len(means)) - 1]

    _, low, high = bootstrap_interval(values, resamples=40_000)
    assert exact(0.015) <= low <= exact(0.035)
    assert exact(0.965) <= high <= exact(0.985)


@pytest.mark.parametrize("low, high, expect", [
    (0.01, 0.05, "helps"), (-0.05, -0.01, "hurts"), (-0.01, 0.05, "no difference resolved"),
    (0.0, 0.05, "no difference resolved"), (0.0, 0.0, "no difference resolved"),
])
def test_verdict_reads_the_interval_only(low, high, expect):
    assert verdict(low, high) == expect


def test_report_shows_the_paired_intervals_recomputed_from_scores_csv(budget_study):
    out, report = budget_study
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "paired.csv", newline="") as f:
        paired = {(r["labels"], r["organs"]): r for r in csv.DictReader(f)}
    for labels in ("1", "2"):
        units = {}
        for r in rows:
            key = (r["experiment"], r["seed"], r["case"])
            if r["labels"] == labels:
                units.setdefault(key, []).append(float(r["dsc"]))
        seeds, cases = sorted({s for _, s, _ in units}), sorted({c for _, _, c in units})
        diffs = [[statistics.fmean(units[("smoke", s, c)]) - statistics.fmean(units[("smoke-scratch", s, c)])
                  for c in cases] for s in seeds]
        mean, low, high = reference_crossed_interval(diffs)
        row = paired[(labels, "mean")]
        assert (float(row["difference"]), float(row["low"]), float(row["high"])) == pytest.approx(
            (mean, low, high), abs=1e-6)
        assert int(row["units"]) == 2 and row["verdict"] == verdict(float(row["low"]), float(row["high"]))
        assert f"| smoke − smoke-scratch | {labels} | 2 | mean | {100 * mean:+.1f} [{100 * low:+.1f}, " \
               f"{100 * high:+.1f}] | **{row['verdict']}** |" in report.read_text()
    text = report.read_text()
    for heading in ("## Learning curves", "## Does pretraining help?", "Per organ", "## Per run"):
        assert heading in text


def test_budget_report_figures(budget_study):
    pytest.importorskip("matplotlib", reason="the plots are the optional seg[report] extra")
    out, report = budget_study
    for name in ("learning_curves.png", "curves.png"):
        assert (out / "figures" / name).stat().st_size > 1000 and f"(figures/{name})" in report.read_text()


class Stop(Exception):
    """Stands for the study being stopped."""


def test_a_rerun_continues_partially_trained_runs_from_their_latest_checkpoint(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path / "data", 2, 1, seed=0, test=1)
    args = (["smoke"], tmp_path / "data", tmp_path / "out")
    options = {"seeds": (0,), "labels": (1,), "device": "cpu"}
    real = {"pretrain": study_module.pretrain, "finetune": study_module.finetune}

    def stopped_after_one_epoch(stage):
        def run(**kwargs):
            real[stage](**kwargs, epochs=1)
            raise Stop()
        return run

    pretrain_run = tmp_path / "out/smoke/pretrain-seed0"
    finetune_run = tmp_path / "out/smoke/pretrain0-seed0/labels1/finetune"
    monkeypatch.setattr(study_module, "pretrain", stopped_after_one_epoch("pretrain"))
    with pytest.raises(Stop):
        run_study(*args, **options)
    first = json.loads((pretrain_run / "metrics.json").read_text())
    assert [r["epoch"] for r in first] == [1] and not finetune_run.exists()

    monkeypatch.setattr(study_module, "pretrain", real["pretrain"])
    monkeypatch.setattr(study_module, "finetune", stopped_after_one_epoch("finetune"))
    with pytest.raises(Stop):
        run_study(*args, **options)
    history = json.loads((pretrain_run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == first[0]  # continued, not redone
    assert "resumed from" in (pretrain_run / "log.txt").read_text()
    partial = json.loads((finetune_run / "metrics.json").read_text())

    monkeypatch.setattr(study_module, "finetune", real["finetune"])
    finished = (pretrain_run / LATEST).stat().st_mtime_ns
    run_study(*args, **options)
    history = json.loads((finetune_run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[0] == partial[0]
    assert "resumed from" in (finetune_run / "log.txt").read_text()
    assert (pretrain_run / LATEST).stat().st_mtime_ns == finished  # a finished run is not touched
    assert (tmp_path / "out/report.md").exists()

    # a changed fine-tuning setting keeps the pretraining (it does not read it) and refuses the old fine-tuning
    with pytest.raises(ConfigError, match=r"labels1/finetune: made with other settings, finetune\.epochs \(3 there, 4 "
                                          r"now\); give seg study another --out"):
        run_study(*args, **options, overrides=("finetune.epochs=4",))
    assert (pretrain_run / LATEST).stat().st_mtime_ns == finished
    with pytest.raises(ConfigError, match=r"pretrain-seed0: made with other settings, pretrain\.optimizer\.lr"):
        run_study(*args, **options, overrides=("pretrain.optimizer.lr=0.5",))


def test_pretraining_overrides_skip_experiments_without_pretraining():
    overrides = ("pretrain.probe_every=1", "finetune.epochs=2")
    assert experiment_overrides("smoke", overrides) == overrides
    assert experiment_overrides("smoke-scratch", overrides) == ("finetune.epochs=2",)
    assert [e.finetune.epochs for e in resolve_experiments(["smoke", "smoke-scratch"], overrides)] == [2, 2]


def test_cli_refuses_bad_label_budgets(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 2, 0, seed=0, test=1)
    common = ("study", "--experiments", "smoke-scratch", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert_one_line_error(seg_cli(*common, "--labels", "1,3"), "--labels 3", "1 to 2", code=2)
    assert_one_line_error(seg_cli(*common, "--pretrain-seeds", "0"), "--pretrain-seeds", "--labels", code=2)
    assert not (tmp_path / "o").exists()


# ---- validation cases kept out of every budget (--val-cases) -------------------------------------------------

def _case(name):
    return type("Case", (), {"name": name})()


def test_training_and_validation_keeps_named_validation_cases_out_of_training():
    cases = [_case(n) for n in ("a", "b", "c", "d")]
    names = lambda picked: [c.name for c in picked]  # noqa: E731
    cfg = load_experiment("smoke", ("finetune.val_cases=[\"d\"]",)).finetune
    train, val = training_and_validation(cases, cfg, Path("DATA"), seed=0)
    assert names(train) == ["a", "b", "c"] and names(val) == ["d"]
    cfg = load_experiment("smoke", ("finetune.val_cases=[\"d\"]", "finetune.cases=[\"b\"]")).finetune
    train, val = training_and_validation(cases, cfg, Path("DATA"), seed=0)
    assert names(train) == ["b"] and names(val) == ["d"]  # one training case: no longer validated on itself
    cfg = load_experiment("smoke", ("finetune.cases=[\"b\"]",)).finetune
    assert [names(x) for x in training_and_validation(cases, cfg, Path("DATA"), seed=0)] == [["b"], ["b"]]
    for overrides, message in [(("finetune.val_cases=[\"d\"]", "finetune.cases=[\"d\"]"), "'d' is also in"),
                               (("finetune.val_cases=[\"e\"]",), "no labeled case 'e' in DATA"),
                               (("finetune.val_cases=[\"a\",\"b\",\"c\",\"d\"]",), "none is left")]:
        with pytest.raises(ConfigError, match=message):
            training_and_validation(cases, load_experiment("smoke", overrides).finetune, Path("DATA"), seed=0)


def test_validation_cases_lie_outside_every_budget_of_their_seed():
    names = [f"case{i:02d}" for i in range(8)]
    for seed in range(5):
        val = validation_cases(names, seed, 2)
        subsets = label_subsets(names, (1, 2, 4, 6), seed)
        assert len(val) == 2 and not set(val) & set(subsets[6]) and set(val) | set(subsets[6]) == set(names)
        assert validation_cases(list(reversed(names)), seed, 2) == val
    assert validation_cases(names, 0, 0) == []
    assert len({tuple(validation_cases(names, s, 2)) for s in range(6)}) > 1


def test_budget_study_validates_every_run_of_a_seed_on_the_cases_kept_aside(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 3, 0, seed=0, test=1)
    run_study(["smoke-scratch"], tmp_path / "data", tmp_path / "out", seeds=(1,), labels=(1, 2), val_cases=1,
              overrides=("finetune.epochs=1", "finetune.val_every=1"), device="cpu")
    names = [f"synth_{i:04d}" for i in range(3)]
    val = validation_cases(names, 1, 1)
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert [r["labels"] for r in runs] == [1, 2]
    for r in runs:
        assert r["val_cases"] == val and not set(val) & set(r["cases"]) and len(r["cases"]) == r["labels"]
        log = (Path(r["folder"]) / "finetune" / "log.txt").read_text()
        assert f"fine-tuning on {r['labels']} cases, validating on 1: {val[0]}" in log


def test_cli_refuses_bad_validation_counts(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 3, 0, seed=0, test=1)
    common = ("study", "--experiments", "smoke-scratch", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert_one_line_error(seg_cli(*common, "--labels", "1,3", "--val-cases", "1"), "--labels 3", "1 to 2",
                          "besides 1 validation case", code=2)
    assert_one_line_error(seg_cli(*common, "--labels", "1", "--val-cases", "3"), "--val-cases 3", "fewer than", code=2)
    assert_one_line_error(seg_cli(*common, "--val-cases", "1"), "--val-cases", "--labels", code=2)
    assert not (tmp_path / "o").exists()


def test_a_study_in_two_jobs_runs_the_same_runs_each_after_its_pretraining(budget_study, tmp_path):
    """The budget study again with --jobs 2: the same runs, subsets and validation, every fine-tuning run
    loading the finished shared pretraining; scores close to the one-job study (thread counts differ)."""
    from tests.reliability.conftest import seg_cli as run_seg

    out, _ = budget_study
    data = out.parent / "data"
    args = ["study", "--experiments", "smoke,smoke-scratch", "--data", data, "--out", tmp_path / "out", "--seeds",
            "0,1", "--labels", "1,2", "--jobs", "2", "--device", "cpu"]
    result = run_seg(*args, *[a for o in BUDGET_SETTINGS for a in ("--set", o)])
    assert result.returncode == 0, result.stderr
    one, two = (json.loads((o / "runs.json").read_text()) for o in (out, tmp_path / "out"))
    assert [(r["experiment"], r["seed"], r["labels"], r["cases"]) for r in two] == \
        [(r["experiment"], r["seed"], r["labels"], r["cases"]) for r in one]
    shared = tmp_path / "out" / "smoke" / "pretrain-seed0"
    pretrained_at = (shared / LATEST).stat().st_mtime
    started = {}  # a run folder's config.toml is written once, when the run starts
    for r in two:
        log = (Path(r["folder"]) / "finetune" / "log.txt").read_text()
        assert (f"--init {shared / LATEST}: loaded" in log) == (r["experiment"] == "smoke")
        started.setdefault(r["experiment"], []).append((Path(r["folder"]) / "finetune" / "config.toml").stat().st_mtime)
    assert min(started["smoke"]) >= pretrained_at  # after the pretraining finished
    assert min(started["smoke-scratch"]) < pretrained_at  # beside it: two jobs at a time
    assert (tmp_path / "out" / "report.md").exists()


def test_last_quarter_gain_is_the_rise_of_the_best_validation_score(tmp_path):
    """Epochs 1-8, validation every 2: the mark is epoch 6. Before it the best is 0.60 (a dip to 0.55 at the
    mark); after it 0.58 and 0.605: the best rose by 0.005, not the 0.055 from the dip."""
    history = [{"epoch": e, "loss": 1.0} for e in range(1, 9)]
    for row, score in zip(history[1::2], (0.50, 0.60, 0.55, 0.605)):
        row["val_mean_dice"] = score
    history[6]["val_mean_dice"] = 0.58  # epoch 7
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "metrics.json").write_text(json.dumps(history))
    run = tmp_path / "finetune"
    assert history_gain(run_history(run)) == pytest.approx(0.005)
    (run / "metrics.json").write_text(json.dumps(history[:6]))  # nothing after the mark (4.5)
    assert history_gain(run_history(run)) == pytest.approx(0.55 - 0.60)
    (run / "metrics.json").write_text(json.dumps([{"epoch": 1, "loss": 1.0}]))
    assert history_gain(run_history(run)) is None


def test_validation_noise_is_the_mean_step_between_late_validations():
    """Ten epochs, validated every epoch: the second half (epochs 6-10) scores 0.70, 0.74, 0.71, 0.71, 0.75, so
    the steps are 0.04, 0.03, 0, 0.04 and their mean 0.0275; the early climb (epochs 1-5) does not count."""
    scores = (0.1, 0.3, 0.5, 0.6, 0.65, 0.70, 0.74, 0.71, 0.71, 0.75)
    history = [{"epoch": e, "val_mean_dice": v} for e, v in enumerate(scores, 1)]
    history[2]["val_mean_dice"] = None  # a skipped validation is not a score
    assert history_noise(history) == pytest.approx(0.0275)
    assert history_noise(history[:9] + [{"epoch": 10, "loss": 1.0}]) == pytest.approx((0.04 + 0.03 + 0) / 3)
    assert history_noise([{"epoch": 1, "val_mean_dice": 0.5}, {"epoch": 2, "val_mean_dice": 0.6}]) is None


def test_per_run_table_counts_converged_runs_and_training_compute(tmp_path):
    """Two fine-tuning runs from one shared pretraining: one converged (+0.5 points), one not (+2.0), 1800 and
    5400 training CPU-s; the pretraining (3600 CPU-s) is counted once. Validation noise over epochs 5-8 (scores
    at 6 and 8): 5.5 and 7.0 points."""
    def run_folder(name, cpu, scores):
        folder = tmp_path / name
        history = [{"epoch": e, "train_cpu_s": cpu * e / 8} for e in range(1, 9)]
        for row, score in zip(history[1::2], scores):
            row["val_mean_dice"] = score
        (folder / "finetune").mkdir(parents=True)
        (folder / "finetune" / "metrics.json").write_text(json.dumps(history))
        return folder

    pretraining = tmp_path / "pretrain"
    pretraining.mkdir()
    (pretraining / "metrics.json").write_text(json.dumps([{"epoch": 1, "train_cpu_s": 3600.0}]))
    scores = {"liver": {"dsc": 0.5, "nsd": 0.5}, "right_adrenal_gland": {"dsc": 0.1, "nsd": 0.1}}
    runs = [StudyRun("pre", 0, run_folder("a", 1800.0, (0.5, 0.6, 0.55, 0.605)), scores, "pcrl", 1, init=pretraining),
            StudyRun("pre", 1, run_folder("b", 5400.0, (0.5, 0.6, 0.55, 0.62)), scores, "pcrl", 1, init=pretraining)]
    text = seed_markdown(runs)
    assert "| +0.5 | 5.50 | 1800 |" in text and "| +2.0 (not converged) | 7.00 | 5400 |" in text
    assert ("Converged: 1 of 2 fine-tuning runs with a validation curve; largest last-quarter gain of the others "
            "+2.0 points. Validation noise: median 6.25 points (range 5.50-7.00). Training compute: 2.00 CPU-hours of fine-tuning over 2 runs (median 3600 CPU-s), 1.00 "
            "CPU-hours of pretraining over 1 runs (each shared run counted once).") in text
