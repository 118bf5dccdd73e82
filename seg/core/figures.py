"""The study report's figures (matplotlib, the optional ``seg[report]`` extra): learning curves with interval
bands, training curves with the last quarter marked, per-organ bars, and the prediction overlays (copied
previews, no matplotlib). Each writes its PNG atomically into ``figures/`` and returns its Markdown link."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from seg.core.convergence import run_history
from seg.core.evaluate import flare22_value
from seg.core.io import atomic_path
from seg.core.study_scores import (SMALL_ORGANS, budget_key, experiment_names, group_name, label_budgets,
                                   learning_curve, mean_std, organ_groups, organ_heading)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib (``seg[report]``) is not installed."""
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


def learning_curves_figure(plt, rows, runs, figures: Path) -> str:
    """``figures/learning_curves.png``: mean DSC against labeled cases per experiment with interval bands, for
    every organ, the small organs and each small organ; returns its Markdown link."""
    groups = organ_groups(rows)
    panels = [("all organs", None), ("small organs", groups.get("small organs"))]
    panels += [(name, [o for o in groups if flare22_value(o) in values]) for name, values in SMALL_ORGANS.items()]
    panels = [(title, organs) for title, organs in panels if organs is None or organs]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, organs) in zip(axes.flat, panels):
        for name in experiment_names(runs):
            curve = learning_curve(rows, name, organs)
            x = [budget_key(n) for n in curve]
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


def curves_figure(plt, runs, figures: Path) -> str:
    """``figures/curves.png``: pretraining loss and probe Dice, then per label budget the fine-tuning loss and
    validation mean Dice (the last quarter marked); returns its Markdown link."""
    pretrained = list(dict.fromkeys((r.experiment, r.pretrain_seed, r.init) for r in runs if r.init is not None))
    budgets = label_budgets(runs)
    fig, axes = plt.subplots(1 + len(budgets), 2, figsize=(12, 3.6 * (1 + len(budgets))), squeeze=False)
    for name, seed, folder in pretrained:
        history = run_history(Path(folder))
        for ax, key in zip(axes[0], ("loss", "probe_dice")):
            rows = [r for r in history if key in r]
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=f"{name} s{seed}", marker=".")
    titles = ["pretraining loss", "probe: validation mean Dice after a short fine-tuning (probe_every)"]
    for row, labels in enumerate(budgets, start=1):
        epochs = []
        for run in (r for r in runs if r.labels == labels):
            history = run_history(run.folder / "finetune")
            epochs += [history[-1]["epoch"]] if history else []
            for ax, key in zip(axes[row], ("loss", "val_mean_dice")):
                rows = [r for r in history if key in r]
                label = f"{run.experiment} s{run.seed}" + ("" if run.pretrain_seed is None or run.labels is None
                                                           else f" p{run.pretrain_seed}")
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=label, marker=".")
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


def organ_bars_figure(plt, runs, figures: Path) -> str:
    """``figures/organs_dsc.png``: per-organ test DSC per experiment, mean and sd over seeds; returns its link."""
    organs = list(runs[0].scores)
    names = list(dict.fromkeys(map(group_name, runs)))
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = [r for r in runs if group_name(r) == name]
        stats = [mean_std([100 * r.scores[o]["dsc"] for r in mine]) for o in organs]
        ax.bar([k + i * width for k in range(len(organs))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=2, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(organs))], [organ_heading(o) for o in organs])
    ax.set_ylabel("DSC (%)")
    ax.set_title("per-organ DSC on the test cases (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, figures / "organs_dsc.png")
    plt.close(fig)
    return "![per-organ DSC](figures/organs_dsc.png)\n"


def overlays(runs, figures: Path) -> str:
    """Each experiment's first preview PNG (its largest budget, lowest seed) copied into ``figures/``, as
    Markdown (no matplotlib needed)."""
    lines = []
    for name in experiment_names(runs):
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
