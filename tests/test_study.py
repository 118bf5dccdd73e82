"""``seg study`` at smoke size end to end, and the report's numbers checked against the runs' own files."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest

from seg.core.report import adrenal_verdict, organ_table
from seg.core.study import StudyRun, run_study
from seg.core.synth import write_synthetic_dataset
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
    for heading in ("## Dice similarity coefficient", "## Normalized surface Dice", "## Per seed",
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
                                  str(tmp_path / "o"), "--seeds", "0,x"), "--seeds")
    assert_one_line_error(seg_cli("study", "--experiments", "smoke,nope", "--data", str(tmp_path), "--out",
                                  str(tmp_path / "o")), "nope")
    assert not (tmp_path / "o").exists()


def test_study_without_test_cases_says_where_it_looked(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 2, 0, seed=0)
    result = seg_cli("study", "--experiments", "smoke-scratch", "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "o"))
    assert_one_line_error(result, "imagesTs", "--test")
    assert not (tmp_path / "o").exists()
