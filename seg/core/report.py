"""The study report: a self-contained ``report.md`` with per-organ tables (the paper's Tables 3 and 4), a
per-run summary with each run's convergence, a plain verdict on the paper's finding, ``scores.csv`` with every
case's scores, and figures in ``figures/`` (``seg.core.figures``). A label-budget study adds the learning curves
(mean DSC against the number of labeled cases, with 95 % bootstrap bands) and the paired differences against the
experiment without pretraining (``paired.csv``). The numbers come from ``seg.core.study_scores`` and
``seg.core.convergence``, which read the runs' files; none is typed in."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from seg.core.convergence import CONVERGED, history_cpu_seconds, history_gain, history_noise, run_history
from seg.core.figures import curves_figure, learning_curves_figure, organ_bars_figure, overlays, pyplot
from seg.core.io import write_text
from seg.core.study_scores import (adrenal_dsc, experiment_names, group_name, learning_curve, mean_std,
                                   organ_groups, organ_heading, organ_table, overall_score, paired_table, score_rows)


def _organ_markdown(organs, table, note) -> str:
    lines = ["| experiment | " + " | ".join(map(organ_heading, organs)) + " | Mean |", "|---" * (len(organs) + 2) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    return "\n".join(lines) + f"\n\n{note}\n"


def _compute_summary(runs, gains: list, noises: list, cpus: list) -> str:
    """How many fine-tuning runs converged (``gains``), their median validation noise (``noises``), and the
    training compute of the study (``cpus`` of the fine-tuning runs; each shared pretraining run counted once)."""
    measured = [g for g in gains if g is not None]
    open_runs = [g for g in measured if g >= CONVERGED]
    text = (f"Converged: {len(measured) - len(open_runs)} of {len(measured)} fine-tuning runs with a validation "
            f"curve" + (f"; largest last-quarter gain of the others {100 * max(open_runs):+.1f} points" if open_runs
                        else "") + ". ")
    noise = [n for n in noises if n is not None]
    if noise:
        text += (f"Validation noise: median {100 * statistics.median(noise):.2f} points (range "
                 f"{100 * min(noise):.2f}-{100 * max(noise):.2f}). ")
    finetune = [c for c in cpus if c is not None]
    pretrain = [c for c in (history_cpu_seconds(run_history(p)) for p in dict.fromkeys(r.init for r in runs if r.init))
                if c is not None]
    if finetune:
        text += (f"Training compute: {sum(finetune) / 3600:.2f} CPU-hours of fine-tuning over {len(finetune)} runs "
                 f"(median {statistics.median(finetune):.0f} CPU-s)")
        text += (f", {sum(pretrain) / 3600:.2f} CPU-hours of pretraining over {len(pretrain)} runs (each shared run "
                 f"counted once)." if pretrain else ".")
    return text + "\n"


def seed_markdown(runs) -> str:
    """The per-run table: scores, convergence and training CPU-s of every run, then the study's totals."""
    lines = ["| experiment | pretraining | pretraining seed | seed | labeled cases | mean DSC | mean NSD | adrenal DSC "
             "| validation gain, last quarter | validation noise | training CPU-s |", "|---" * 11 + "|"]
    histories = [run_history(r.folder / "finetune") for r in runs]
    gains, noises, cpus = ([f(h) for h in histories] for f in (history_gain, history_noise, history_cpu_seconds))
    for r, gain, noise, cpu in zip(runs, gains, noises, cpus):
        flag = "" if gain is None or gain < CONVERGED else " (not converged)"
        dsc, nsd = 100 * overall_score(r, "dsc"), 100 * overall_score(r, "nsd")
        lines.append(f"| {r.experiment} | {r.pretrain or 'none'} | {'-' if r.pretrain_seed is None else r.pretrain_seed}"
                     f" | {r.seed} | {r.labels or 'all'} | {dsc:.1f} | {nsd:.1f}"
                     f" | {100 * adrenal_dsc(r):.1f} | {'-' if gain is None else f'{100 * gain:+.1f}'}{flag} | "
                     f"{'-' if noise is None else f'{100 * noise:.2f}'} | {'-' if cpu is None else f'{cpu:.0f}'} |")
    for name in dict.fromkeys(map(group_name, runs)):
        mine = [r for r in runs if group_name(r) == name]
        if len(mine) > 1:
            cells = [mean_std([f(r) for r in mine]) for f in
                     (lambda r: overall_score(r, "dsc"), lambda r: overall_score(r, "nsd"), adrenal_dsc)]
            lines.append(f"| **{name}** | | | | mean ± sd | " + " | ".join(f"{100 * m:.1f} ± {100 * s:.1f}"
                                                                           for m, s in cells) + " | | | |")
    return "\n".join(lines) + (f"\n\nValidation gain: the best validation mean Dice (points) after 3/4 of the "
                               f"epochs minus the best before (figures/curves.png marks the last quarter); a run gaining "
                               f"{100 * CONVERGED:.0f} point or more is marked not converged. Validation noise: the mean "
                               f"change (points) from one validation to the next over the second half of the epochs. "
                               f"Training CPU-s: the fine-tuning steps' process CPU time (validation excluded).\n\n"
                               + _compute_summary(runs, gains, noises, cpus))


def adrenal_verdict(runs) -> str:
    """Plain sentences, computed from the runs, on whether pretraining helped the adrenal glands: each
    pretrained experiment against the study's experiment without pretraining, beyond the seed-to-seed spread
    (the sum of both sample standard deviations) or not."""
    baselines = dict.fromkeys(r.experiment for r in runs if r.pretrain is None)
    if not baselines:
        return "No experiment without pretraining in this study, so the pretraining finding was not tested."
    baseline = next(iter(baselines))
    if max(adrenal_dsc(r) for r in runs) < 0.01:
        return ("- **Not testable at this scale**: no run segmented the adrenal glands (DSC below 1 % in every run), "
                "so pretraining had nothing to improve on them.")
    base_mean, base_std = mean_std([adrenal_dsc(r) for r in runs if r.experiment == baseline])
    lines = []
    for name in experiment_names(runs):
        if name in baselines:
            continue
        values = [adrenal_dsc(r) for r in runs if r.experiment == name]
        mean, std = mean_std(values)
        if len(values) < 2:
            verdict_ = "**not resolved**: one seed gives no spread to judge the difference against"
        elif mean - base_mean > std + base_std:
            verdict_ = "**held**: pretraining improved the adrenal glands beyond the seed-to-seed spread"
        elif base_mean - mean > std + base_std:
            verdict_ = "**did not hold**: pretraining made the adrenal glands worse beyond the spread"
        else:
            verdict_ = "**not resolved**: the difference is within the seed-to-seed spread"
        lines.append(f"- `{name}` vs `{baseline}`: adrenal mean DSC {100 * mean:.1f} ± {100 * std:.1f} vs "
                     f"{100 * base_mean:.1f} ± {100 * base_std:.1f} (%, mean ± sd over seeds) — "
                     f"the finding {verdict_}.")
    return "\n".join(lines)


def _write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(buffer.getvalue(), path)


def write_scores_csv(runs, path: Path) -> None:
    """``score_rows`` as a CSV file."""
    _write_csv(score_rows(runs), path)


def _interval(mean: float, low: float, high: float, sign: str = "") -> str:
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def _paired_markdown(table: list[dict]) -> str:
    summary = [r for r in table if r["organs"] in ("mean", "small organs", "adrenal glands")]
    lines = ["| experiment − baseline | labeled cases | units | organs | DSC difference [95 % CI] | verdict |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['experiment']} − {r['baseline']} | {r['labels']} | {r['units']} | {r['organs']} | "
                     f"{_interval(r['difference'], r['low'], r['high'], '+')} | **{r['verdict']}** |")
    organs = list(dict.fromkeys(r["organs"] for r in table if r["organs"] not in ("mean", "small organs",
                                                                                    "adrenal glands")))
    lines += ["", "Per organ (bold: the interval excludes 0):", "",
              "| experiment | labeled cases | " + " | ".join(map(organ_heading, organs)) + " |",
              "|---" * (len(organs) + 2) + "|"]
    for key in dict.fromkeys((r["experiment"], r["labels"]) for r in table):
        cells = {r["organs"]: r for r in table if (r["experiment"], r["labels"]) == key}
        text = [_interval(c["difference"], c["low"], c["high"], "+") for c in (cells[o] for o in organs)]
        bold = [f"**{t}**" if cells[o]["verdict"] != "no difference resolved" else t for o, t in zip(organs, text)]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(bold) + " |")
    return "\n".join(lines) + (
        "\n\nDSC points (pretrained minus no pretraining) on paired units: the same fine-tuning seed, label subset "
        "and test case (one unit per pretraining seed, seed and case). Intervals: percentile bootstrap resampling "
        "the seeds and the test cases independently (crossed: every seed is scored on the same cases; 10 000 "
        "resamples, numpy seed 0). The verdict reads the interval only: \"helps\" when it lies above "
        "0, \"hurts\" when below, else \"no difference resolved\". Every row: `paired.csv`.\n")


def _curve_markdown(rows, runs) -> str:
    groups = organ_groups(rows)
    lines = ["| experiment | labeled cases | mean DSC [95 % CI] | small organs DSC [95 % CI] |", "|---|---|---|---|"]
    for name in experiment_names(runs):
        every, small = learning_curve(rows, name), learning_curve(rows, name, groups.get("small organs"))
        for labels, interval in every.items():
            lines.append(f"| {name} | {labels} | {_interval(*interval)} | "
                         f"{_interval(*small[labels]) if labels in small else '-'} |")
    return "\n".join(lines) + "\n\nDSC in %, mean over the test cases and seeds; intervals as below.\n"


def _budget_sections(rows, runs, plt, figures: Path, out: Path) -> list[str]:
    table = paired_table(rows, runs)
    if table:
        _write_csv([{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in table],
                   out / "paired.csv")
    no_plots = "Plots need matplotlib: `pip install seg[report]`.\n"
    return ["## Learning curves\n", learning_curves_figure(plt, rows, runs, figures) if plt else no_plots,
            _curve_markdown(rows, runs),
            "## Does pretraining help? Paired differences per label budget\n",
            _paired_markdown(table) if table else "No experiment without pretraining to compare with.\n"]


def write_report(runs, out: Path, command: str | None = None) -> Path:
    """Write ``out/report.md``, ``out/scores.csv`` (and, for a label-budget study, ``out/paired.csv``) and
    ``out/figures/`` from the finished ``runs``; returns the report's path."""
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows = score_rows(runs)
    _write_csv(rows, out / "scores.csv")
    seeds = sorted({r.seed for r in runs})
    note = f"Scores in %, mean over the test cases, then over seeds {seeds}. Every case's scores: `scores.csv`."
    organs, dsc = organ_table(runs, "dsc")
    _, nsd = organ_table(runs, "nsd")
    plt = pyplot()
    no_plots = "Plots need matplotlib: `pip install seg[report]`.\n"
    budgets = any(r.labels is not None for r in runs)
    parts = ["# Study report\n", f"Regenerate with: `{command}`\n" if command else ""]
    if budgets:
        parts += _budget_sections(rows, runs, plt, figures, out)
    parts += [
        "## Dice similarity coefficient (DSC)\n", _organ_markdown(organs, dsc, note),
        "## Normalized surface Dice (NSD)\n", _organ_markdown(organs, nsd, note),
        "## Per run\n", seed_markdown(runs),
    ]
    if not budgets:
        parts += ["## The paper's finding: pretraining helps the small organs (adrenal glands)\n",
                  adrenal_verdict(runs) + "\n"]
    parts += [
        "## Per-organ DSC\n", organ_bars_figure(plt, runs, figures) if plt else no_plots,
        "## Training curves\n", curves_figure(plt, runs, figures) if plt else no_plots,
        "## Example overlays (first test case; axial, coronal, sagittal)\n", overlays(runs, figures),
        "## Runs\n",
    ]
    for run in runs:
        rel = run.folder.relative_to(out)
        budget = "" if run.labels is None else f", {run.labels} labeled case(s): {', '.join(run.cases)}"
        parts.append(f"- `{run.experiment}` seed {run.seed}{budget}: `{rel}/` (commands in `*/command.txt`, "
                     f"resolved configuration in `*/config.toml`, checkpoints, predictions)")
    parts.append("\n## Resolved configurations\n")
    for name in experiment_names(runs):
        config = next(r for r in runs if r.experiment == name).folder / "finetune" / "config.toml"
        if config.exists():
            parts.append(f"<details><summary>{name}</summary>\n\n```toml\n{config.read_text()}```\n</details>\n")
    path = out / "report.md"
    write_text("\n".join(parts), path)
    return path
