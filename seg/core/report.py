"""The study report: a self-contained ``report.md`` with per-organ tables (the paper's Tables 3 and 4), a
per-run summary, a plain verdict on the paper's finding, ``scores.csv`` with every case's scores, and figures
in ``figures/`` (training curves, per-organ bars and learning curves need the optional ``seg[report]`` extra,
matplotlib; the overlays do not). A label-budget study adds the learning curves (mean DSC against the number
of labeled cases, with 95 % bootstrap bands) and the paired differences against the experiment without
pretraining (``paired.csv``; ``seg.core.study`` computes them). Every number comes from the runs' files; none
is typed in."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import numpy as np

from seg.core.evaluate import SHORT_NAMES, flare22_value
from seg.core.io import atomic_path, write_text
from seg.core.study import bootstrap_interval, case_values, paired_differences, unit_table, verdict

ADRENALS = ("right_adrenal_gland", "left_adrenal_gland")
#: the small organs of the paper's finding, by FLARE22 label value
SMALL_ORGANS = {"adrenal glands": (7, 8), "gallbladder": (9,), "esophagus": (10,), "pancreas": (4,), "duodenum": (12,)}
CONVERGED = 0.01  # a run has converged when its validation Dice gains less than this over its last quarter


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _experiments(runs) -> list[str]:
    return list(dict.fromkeys(r.experiment for r in runs))


def _group(run) -> str:
    return run.experiment if run.labels is None else f"{run.experiment} @ {run.labels}"


def _budgets(runs) -> list:
    return sorted({r.labels for r in runs}, key=lambda n: float("inf") if n is None else n)


def _overall(run, metric: str) -> float:
    return statistics.fmean(s[metric] for s in run.scores.values())


def _adrenal(run) -> float:
    return statistics.fmean(run.scores[o]["dsc"] for o in ADRENALS if o in run.scores)


def organ_table(runs, metric: str) -> tuple[list[str], dict[str, list[float]]]:
    """Organ names, and per experiment (and label budget) the per-organ score averaged over its runs, then
    their mean."""
    organs = list(runs[0].scores)
    table = {}
    for name in dict.fromkeys(map(_group, runs)):
        mine = [r for r in runs if _group(r) == name]
        row = [statistics.fmean(r.scores[o][metric] for r in mine) for o in organs]
        table[name] = row + [statistics.fmean(row)]
    return organs, table


def _heading(organ: str) -> str:
    value = flare22_value(organ)
    return SHORT_NAMES[value] if value is not None else organ


def _organ_markdown(organs, table, note) -> str:
    lines = ["| experiment | " + " | ".join(map(_heading, organs)) + " | Mean |", "|---" * (len(organs) + 2) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    return "\n".join(lines) + f"\n\n{note}\n"


def _history(run_dir: Path) -> list[dict]:
    """A stage's run folder's ``metrics.json`` records, one per epoch ([] before its first epoch)."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []


def last_quarter_gain(run) -> float | None:
    """How much the fine-tuning run's best validation mean Dice rose over its last quarter of epochs: the best
    score after 3/4 of the epochs minus the best at or before it (None without a validation on each side). The
    best so far, not the last score: a noisy dip just before the mark followed by a recovery is no improvement."""
    return history_gain(_history(run.folder / "finetune"))


def history_gain(history: list[dict]) -> float | None:
    """:func:`last_quarter_gain` of a run's ``metrics.json`` records (also what ``bench_convergence`` prints)."""
    rows = [r for r in history if r.get("val_mean_dice") is not None]
    if not rows:
        return None
    mark = 0.75 * max(r["epoch"] for r in history)
    before = [r["val_mean_dice"] for r in rows if r["epoch"] <= mark]
    after = [r["val_mean_dice"] for r in rows if r["epoch"] > mark]
    return max(after) - max(before) if before and after else None


def history_noise(history: list[dict]) -> float | None:
    """How much a run's validation mean Dice moves from one validation to the next once it has levelled off: the
    mean absolute change between consecutive validations in the second half of the epochs (None with fewer than
    two there). Weight averaging (``finetune.ema``) exists to make this small."""
    late = [r["val_mean_dice"] for r in history
            if r.get("val_mean_dice") is not None and r["epoch"] > 0.5 * max(x["epoch"] for x in history)]
    return sum(abs(b - a) for a, b in zip(late, late[1:])) / (len(late) - 1) if len(late) > 1 else None


def training_cpu_seconds(run_dir: Path) -> float | None:
    """The training CPU-seconds a stage's run folder spent (its last ``train_cpu_s``; None if it has none)."""
    history = _history(run_dir)
    return float(history[-1]["train_cpu_s"]) if history and "train_cpu_s" in history[-1] else None


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
    pretrain = [c for c in (training_cpu_seconds(p) for p in dict.fromkeys(r.init for r in runs if r.init))
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
    gains = [last_quarter_gain(r) for r in runs]
    noises = [history_noise(_history(r.folder / "finetune")) for r in runs]
    cpus = [training_cpu_seconds(r.folder / "finetune") for r in runs]
    for r, gain, noise, cpu in zip(runs, gains, noises, cpus):
        flag = "" if gain is None or gain < CONVERGED else " (not converged)"
        lines.append(f"| {r.experiment} | {r.pretrain or 'none'} | {'-' if r.pretrain_seed is None else r.pretrain_seed}"
                     f" | {r.seed} | {r.labels or 'all'} | {100 * _overall(r, 'dsc'):.1f} | {100 * _overall(r, 'nsd'):.1f}"
                     f" | {100 * _adrenal(r):.1f} | {'-' if gain is None else f'{100 * gain:+.1f}'}{flag} | "
                     f"{'-' if noise is None else f'{100 * noise:.2f}'} | {'-' if cpu is None else f'{cpu:.0f}'} |")
    for name in dict.fromkeys(map(_group, runs)):
        mine = [r for r in runs if _group(r) == name]
        if len(mine) > 1:
            cells = [_mean_std([f(r) for r in mine]) for f in
                     (lambda r: _overall(r, "dsc"), lambda r: _overall(r, "nsd"), _adrenal)]
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
    if max(_adrenal(r) for r in runs) < 0.01:
        return ("- **Not testable at this scale**: no run segmented the adrenal glands (DSC below 1 % in every run), "
                "so pretraining had nothing to improve on them.")
    base_mean, base_std = _mean_std([_adrenal(r) for r in runs if r.experiment == baseline])
    lines = []
    for name in _experiments(runs):
        if name in baselines:
            continue
        values = [_adrenal(r) for r in runs if r.experiment == name]
        mean, std = _mean_std(values)
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


def _write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(buffer.getvalue(), path)


def write_scores_csv(runs, path: Path) -> None:
    """``score_rows`` as a CSV file."""
    _write_csv(score_rows(runs), path)


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
    budgets = sorted({k[3] for k in values if k[0] == experiment}, key=_budget_key)
    return {n: bootstrap_interval(unit_table({(p, s, c): v for (e, p, s, b, c), v in values.items()
                                              if e == experiment and b == n})) for n in budgets}


def _budget_key(labels: str) -> float:
    return float("inf") if labels == "all" else float(labels)


def paired_table(rows, runs) -> list[dict]:
    """Every pretrained experiment minus the first experiment without pretraining, per label budget and organ
    group (``organ_groups``): units, mean difference, 95 % bootstrap interval, verdict."""
    baselines = [r.experiment for r in runs if r.pretrain is None]
    if not baselines:
        return []
    table = []
    for name in _experiments([r for r in runs if r.pretrain is not None]):
        for labels in _budgets([r for r in runs if r.experiment == name]):
            for group, organs in organ_groups(rows).items():
                diffs = paired_differences(rows, name, baselines[0], labels or "all", organs)
                mean, low, high = bootstrap_interval(diffs)
                table.append({"experiment": name, "baseline": baselines[0], "labels": labels or "all", "organs": group,
                              "units": diffs.size, "difference": mean, "low": low, "high": high,
                              "verdict": verdict(low, high)})
    return table


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
              "| experiment | labeled cases | " + " | ".join(map(_heading, organs)) + " |", "|---" * (len(organs) + 2) + "|"]
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
    for name in _experiments(runs):
        every, small = learning_curve(rows, name), learning_curve(rows, name, groups.get("small organs"))
        for labels, interval in every.items():
            lines.append(f"| {name} | {labels} | {_interval(*interval)} | "
                         f"{_interval(*small[labels]) if labels in small else '-'} |")
    return "\n".join(lines) + "\n\nDSC in %, mean over the test cases and seeds; intervals as below.\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


def _learning_curves(plt, rows, runs, figures: Path) -> str:
    groups = organ_groups(rows)
    panels = [("all organs", None), ("small organs", groups.get("small organs"))]
    panels += [(name, [o for o in groups if flare22_value(o) in values]) for name, values in SMALL_ORGANS.items()]
    panels = [(title, organs) for title, organs in panels if organs is None or organs]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, organs) in zip(axes.flat, panels):
        for name in _experiments(runs):
            curve = learning_curve(rows, name, organs)
            x = [_budget_key(n) for n in curve]
            if any(v == float("inf") for v in x):
                continue
            mean, low, high = (100 * np.array([c[i] for c in curve.values()]) for i in range(3))
            ax.plot(x, mean, marker="o", label=name)
            ax.fill_between(x, low, high, alpha=0.2)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(r["labels"]) for r in rows if r["labels"] != "all"})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_title(f"{title} (mean DSC)")
        ax.set_xlabel("labeled cases")
        ax.set_ylabel("DSC (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, figures / "learning_curves.png")
    plt.close(fig)
    return "![learning curves](figures/learning_curves.png)\n"


def _metric_rows(run_dir: Path, key: str) -> list[dict]:
    return [r for r in _history(run_dir) if key in r]


def _curves(plt, runs, figures: Path) -> str:
    pretrained = list(dict.fromkeys((r.experiment, r.pretrain_seed, r.init) for r in runs if r.init is not None))
    budgets = _budgets(runs)
    fig, axes = plt.subplots(1 + len(budgets), 2, figsize=(12, 3.6 * (1 + len(budgets))), squeeze=False)
    for name, seed, folder in pretrained:
        for ax, key in zip(axes[0], ("loss", "probe_dice")):
            rows = _metric_rows(Path(folder), key)
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=f"{name} s{seed}", marker=".")
    titles = ["pretraining loss", "probe: validation mean Dice after a short fine-tuning (probe_every)"]
    for row, labels in enumerate(budgets, start=1):
        for run in (r for r in runs if r.labels == labels):
            for ax, key in zip(axes[row], ("loss", "val_mean_dice")):
                rows = _metric_rows(run.folder / "finetune", key)
                label = f"{run.experiment} s{run.seed}" + ("" if run.pretrain_seed is None or run.labels is None
                                                           else f" p{run.pretrain_seed}")
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=label, marker=".")
        epochs = [json.loads((r.folder / "finetune" / "metrics.json").read_text())[-1]["epoch"]
                  for r in runs if r.labels == labels and (r.folder / "finetune" / "metrics.json").exists()]
        if epochs:  # the last quarter, over which a converged run gains less than CONVERGED
            axes[row][1].axvline(0.75 * max(epochs), color="grey", linestyle="--", linewidth=0.8)
        budget = "every labeled case" if labels is None else f"{labels} labeled case(s)"
        titles += [f"fine-tuning loss, {budget}", f"validation mean Dice, {budget}"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, figures / "curves.png")
    plt.close(fig)
    return "![training curves](figures/curves.png)\n"


def _organ_bars(plt, runs, figures: Path) -> str:
    organs = list(runs[0].scores)
    names = list(dict.fromkeys(map(_group, runs)))
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = [r for r in runs if _group(r) == name]
        stats = [_mean_std([100 * r.scores[o]["dsc"] for r in mine]) for o in organs]
        ax.bar([k + i * width for k in range(len(organs))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=2, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(organs))], [_heading(o) for o in organs])
    ax.set_ylabel("DSC (%)")
    ax.set_title("per-organ DSC on the test cases (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, figures / "organs_dsc.png")
    plt.close(fig)
    return "![per-organ DSC](figures/organs_dsc.png)\n"


def _overlays(runs, figures: Path) -> str:
    lines = []
    for name in _experiments(runs):
        mine = [r for r in runs if r.experiment == name]
        run = max(mine, key=lambda r: (float("inf") if r.labels is None else r.labels, -r.seed))
        previews = sorted((run.folder / "pred").glob("*.png"))
        if previews:
            target = figures / f"overlay_{name}.png"
            with atomic_path(target) as tmp:
                shutil.copyfile(previews[0], tmp)
            link = target.relative_to(figures.parent)
            budget = "" if run.labels is None else f", {run.labels} labeled case(s)"
            lines.append(f"**{name}**, seed {run.seed}{budget} ({previews[0].stem}):\n\n![{name}]({link})\n")
    return "\n".join(lines)


def _budget_sections(rows, runs, plt, figures: Path, out: Path) -> list[str]:
    table = paired_table(rows, runs)
    if table:
        _write_csv([{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in table],
                   out / "paired.csv")
    no_plots = "Plots need matplotlib: `pip install seg[report]`.\n"
    return ["## Learning curves\n", _learning_curves(plt, rows, runs, figures) if plt else no_plots,
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
    plt = _pyplot()
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
        "## Per-organ DSC\n", _organ_bars(plt, runs, figures) if plt else no_plots,
        "## Training curves\n", _curves(plt, runs, figures) if plt else no_plots,
        "## Example overlays (first test case; axial, coronal, sagittal)\n", _overlays(runs, figures),
        "## Runs\n",
    ]
    for run in runs:
        rel = run.folder.relative_to(out)
        budget = "" if run.labels is None else f", {run.labels} labeled case(s): {', '.join(run.cases)}"
        parts.append(f"- `{run.experiment}` seed {run.seed}{budget}: `{rel}/` (commands in `*/command.txt`, "
                     f"resolved configuration in `*/config.toml`, checkpoints, predictions)")
    parts.append("\n## Resolved configurations\n")
    for name in _experiments(runs):
        config = next(r for r in runs if r.experiment == name).folder / "finetune" / "config.toml"
        if config.exists():
            parts.append(f"<details><summary>{name}</summary>\n\n```toml\n{config.read_text()}```\n</details>\n")
    path = out / "report.md"
    write_text("\n".join(parts), path)
    return path
