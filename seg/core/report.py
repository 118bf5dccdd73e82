"""The study report: ``report.md`` with per-organ tables, a plain verdict on the paper's finding, training
curves and overlays as PNG (plots need the optional ``seg[report]`` extra, matplotlib), commands and configs.
Every number comes from the runs' files; none is typed in."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from seg.core.io import write_text

ADRENALS = ("right_adrenal_gland", "left_adrenal_gland")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def organ_table(runs, metric: str) -> tuple[list[str], dict[str, list[float]]]:
    """Organ names, and per experiment the per-organ score averaged over its seeds (then the mean)."""
    organs = list(runs[0].scores)
    table = {}
    for name in dict.fromkeys(r.experiment for r in runs):
        mine = [r for r in runs if r.experiment == name]
        row = [statistics.fmean(r.scores[o][metric] for r in mine) for o in organs]
        table[name] = row + [statistics.fmean(row)]
    return organs, table


def _markdown_table(organs, table, seeds_note) -> str:
    short = [o.replace("_", " ") for o in organs]
    lines = ["| experiment | " + " | ".join(short) + " | mean |", "|---" * (len(organs) + 2) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    return "\n".join(lines) + f"\n\n{seeds_note}\n"


def adrenal_verdict(runs, baseline: str = "flare22-scratch-vnet") -> str:
    """A plain sentence, computed from the runs, on whether pretraining helped the adrenal glands."""
    if baseline not in {r.experiment for r in runs}:
        return f"No `{baseline}` run in this study, so the pretraining finding was not tested."

    def adrenal(name):
        return [statistics.fmean(r.scores[o]["dsc"] for o in ADRENALS if o in r.scores)
                for r in runs if r.experiment == name]

    base_mean, base_std = _mean_std(adrenal(baseline))
    lines = []
    for name in dict.fromkeys(r.experiment for r in runs):
        if name == baseline:
            continue
        mean, std = _mean_std(adrenal(name))
        noise = max(base_std + std, 0.01)
        if mean - base_mean > noise:
            verdict = "**held**: pretraining improved the adrenal glands beyond the seed-to-seed spread"
        elif base_mean - mean > noise:
            verdict = "**did not hold**: pretraining made the adrenal glands worse beyond the spread"
        else:
            verdict = "**not resolved**: the difference is within the seed-to-seed spread"
        lines.append(f"- `{name}` vs `{baseline}`: adrenal mean DSC {100 * mean:.1f} ± {100 * std:.1f} vs "
                     f"{100 * base_mean:.1f} ± {100 * base_std:.1f} (%) — the finding {verdict}.")
    return "\n".join(lines)


def _curves(runs, out: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Training curves need matplotlib: `pip install seg[report]`.\n"
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
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
    return "![training curves](curves.png)\n"


def _overlays(runs, out: Path) -> str:
    lines = []
    for run in runs:
        previews = sorted((run.folder / "pred").glob("*.png"))
        if previews and run.seed == runs[0].seed:
            rel = previews[0].relative_to(out)
            lines.append(f"**{run.experiment}** ({previews[0].stem}):\n\n![{run.experiment}]({rel})\n")
    return "\n".join(lines)


def write_report(runs, out: Path, command: str | None = None) -> Path:
    """Write ``out/report.md`` (and ``curves.png``) from the finished ``runs``; returns the report's path."""
    seeds = sorted({r.seed for r in runs})
    note = f"Scores in %, mean over test cases, then over seeds {seeds}."
    organs, dsc = organ_table(runs, "dsc")
    _, nsd = organ_table(runs, "nsd")
    parts = [
        "# Study report\n",
        f"Reproduce with: `{command}`\n" if command else "",
        "## Dice similarity coefficient (DSC)\n", _markdown_table(organs, dsc, note),
        "## Normalized surface Dice (NSD)\n", _markdown_table(organs, nsd, note),
        "## The paper's finding: pretraining helps the small organs (adrenal glands)\n",
        adrenal_verdict(runs) + "\n",
        "## Training curves\n", _curves(runs, out),
        "## Example overlays (first test case, axial / coronal / sagittal)\n", _overlays(runs, out),
        "## Runs\n",
    ]
    for run in runs:
        rel = run.folder.relative_to(out)
        parts.append(f"- `{run.experiment}` seed {run.seed}: `{rel}/` — commands in `*/command.txt`, resolved "
                     f"configuration in `*/config.toml`, per-case scores in `{rel}/metrics.csv`")
    first = {}
    for run in runs:
        first.setdefault(run.experiment, run)
    parts.append("\n## Resolved configurations\n")
    for name, run in first.items():
        config = run.folder / "finetune" / "config.toml"
        if config.exists():
            parts.append(f"<details><summary>{name}</summary>\n\n```toml\n{config.read_text()}```\n</details>\n")
    path = Path(out) / "report.md"
    write_text("\n".join(parts), path)
    return path
