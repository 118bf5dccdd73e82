"""The study report: a self-contained ``report.md`` with per-organ tables (the paper's Tables 3 and 4), a
per-seed summary, a plain verdict on the paper's finding, ``scores.csv`` with every case's scores, and figures
in ``figures/`` (training curves and per-organ bars need the optional ``seg[report]`` extra, matplotlib; the
overlays do not). Every number comes from the runs' files; none is typed in."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

from seg.core.evaluate import SHORT_NAMES, flare22_value
from seg.core.io import atomic_path, write_text

ADRENALS = ("right_adrenal_gland", "left_adrenal_gland")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _experiments(runs) -> list[str]:
    return list(dict.fromkeys(r.experiment for r in runs))


def _overall(run, metric: str) -> float:
    return statistics.fmean(s[metric] for s in run.scores.values())


def _adrenal(run) -> float:
    return statistics.fmean(run.scores[o]["dsc"] for o in ADRENALS if o in run.scores)


def organ_table(runs, metric: str) -> tuple[list[str], dict[str, list[float]]]:
    """Organ names, and per experiment the per-organ score averaged over its seeds, then their mean."""
    organs = list(runs[0].scores)
    table = {}
    for name in _experiments(runs):
        mine = [r for r in runs if r.experiment == name]
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


def _seed_markdown(runs) -> str:
    lines = ["| experiment | pretraining | seed | mean DSC | mean NSD | adrenal DSC |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.experiment} | {r.pretrain or 'none'} | {r.seed} | {100 * _overall(r, 'dsc'):.1f} | "
                     f"{100 * _overall(r, 'nsd'):.1f} | {100 * _adrenal(r):.1f} |")
    for name in _experiments(runs):
        mine = [r for r in runs if r.experiment == name]
        if len(mine) > 1:
            cells = [_mean_std([f(r) for r in mine]) for f in
                     (lambda r: _overall(r, "dsc"), lambda r: _overall(r, "nsd"), _adrenal)]
            lines.append(f"| **{name}** | | mean ± sd | " + " | ".join(f"{100 * m:.1f} ± {100 * s:.1f}"
                                                                    for m, s in cells) + " |")
    return "\n".join(lines) + "\n"


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
            verdict = "**not resolved**: one seed gives no spread to judge the difference against"
        elif mean - base_mean > std + base_std:
            verdict = "**held**: pretraining improved the adrenal glands beyond the seed-to-seed spread"
        elif base_mean - mean > std + base_std:
            verdict = "**did not hold**: pretraining made the adrenal glands worse beyond the spread"
        else:
            verdict = "**not resolved**: the difference is within the seed-to-seed spread"
        lines.append(f"- `{name}` vs `{baseline}`: adrenal mean DSC {100 * mean:.1f} ± {100 * std:.1f} vs "
                     f"{100 * base_mean:.1f} ± {100 * base_std:.1f} (%, mean ± sd over seeds) — "
                     f"the finding {verdict}.")
    return "\n".join(lines)


def write_scores_csv(runs, path: Path) -> None:
    """Every run's per-case, per-organ scores in one CSV: experiment, seed, then the columns of metrics.csv."""
    buffer = io.StringIO()
    writer = None
    for run in runs:
        with open(run.folder / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                if writer is None:
                    writer = csv.DictWriter(buffer, ["experiment", "seed", *row], lineterminator="\n")
                    writer.writeheader()
                writer.writerow({"experiment": run.experiment, "seed": run.seed, **row})
    write_text(buffer.getvalue(), path)


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


def _curves(plt, runs, figures: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        label = f"{run.experiment} s{run.seed}"
        for stage, ax, key in (("pretrain", axes[0], "loss"), ("finetune", axes[1], "loss"),
                               ("finetune", axes[2], "val_mean_dice")):
            path = run.folder / stage / "metrics.json"
            if path.exists():
                rows = [r for r in json.loads(path.read_text()) if key in r]
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=label, marker=".")
    for ax, title in zip(axes, ("pretraining loss", "fine-tuning loss", "validation mean Dice")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, figures / "curves.png")
    plt.close(fig)
    return "![training curves](figures/curves.png)\n"


def _organ_bars(plt, runs, figures: Path) -> str:
    organs = list(runs[0].scores)
    names = _experiments(runs)
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = [r for r in runs if r.experiment == name]
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
        run = next(r for r in runs if r.experiment == name)
        previews = sorted((run.folder / "pred").glob("*.png"))
        if previews:
            target = figures / f"overlay_{name}.png"
            with atomic_path(target) as tmp:
                shutil.copyfile(previews[0], tmp)
            link = target.relative_to(figures.parent)
            lines.append(f"**{name}**, seed {run.seed} ({previews[0].stem}):\n\n![{name}]({link})\n")
    return "\n".join(lines)


def write_report(runs, out: Path, command: str | None = None) -> Path:
    """Write ``out/report.md``, ``out/scores.csv`` and ``out/figures/`` from the finished ``runs``; returns the
    report's path."""
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    write_scores_csv(runs, out / "scores.csv")
    seeds = sorted({r.seed for r in runs})
    note = f"Scores in %, mean over the test cases, then over seeds {seeds}. Every case's scores: `scores.csv`."
    organs, dsc = organ_table(runs, "dsc")
    _, nsd = organ_table(runs, "nsd")
    plt = _pyplot()
    no_plots = "Plots need matplotlib: `pip install seg[report]`.\n"
    parts = [
        "# Study report\n",
        f"Regenerate with: `{command}`\n" if command else "",
        "## Dice similarity coefficient (DSC)\n", _organ_markdown(organs, dsc, note),
        "## Normalized surface Dice (NSD)\n", _organ_markdown(organs, nsd, note),
        "## Per seed\n", _seed_markdown(runs),
        "## The paper's finding: pretraining helps the small organs (adrenal glands)\n",
        adrenal_verdict(runs) + "\n",
        "## Per-organ DSC\n", _organ_bars(plt, runs, figures) if plt else no_plots,
        "## Training curves\n", _curves(plt, runs, figures) if plt else no_plots,
        "## Example overlays (first test case; axial, coronal, sagittal)\n", _overlays(runs, figures),
        "## Runs\n",
    ]
    for run in runs:
        rel = run.folder.relative_to(out)
        parts.append(f"- `{run.experiment}` seed {run.seed}: `{rel}/` (commands in `*/command.txt`, resolved "
                     f"configuration in `*/config.toml`, checkpoints, predictions)")
    parts.append("\n## Resolved configurations\n")
    for name in _experiments(runs):
        config = next(r for r in runs if r.experiment == name).folder / "finetune" / "config.toml"
        if config.exists():
            parts.append(f"<details><summary>{name}</summary>\n\n```toml\n{config.read_text()}```\n</details>\n")
    path = out / "report.md"
    write_text("\n".join(parts), path)
    return path
