"""Whether a training run has levelled off, read from its run folder's ``metrics.json``: the last-quarter gain
of the best validation score (the study's convergence rule), the validation noise once the curve is flat, and
the training CPU-seconds spent. The study report and ``benchmarks/bench_convergence.py`` both use these."""

from __future__ import annotations

import json
from pathlib import Path

CONVERGED = 0.01  # a run has converged when its validation Dice gains less than this over its last quarter


def run_history(run_dir: Path) -> list[dict]:
    """A stage's run folder's ``metrics.json`` records, one per epoch ([] before its first epoch)."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []


def history_gain(history: list[dict]) -> float | None:
    """How much the best validation mean Dice rose over the last quarter of epochs: the best score after 3/4 of
    the epochs minus the best at or before it (None without a validation on each side). The best so far, not
    the last score: a noisy dip just before the mark followed by a recovery is no improvement."""
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


def history_cpu_seconds(history: list[dict]) -> float | None:
    """The training CPU-seconds a run's ``metrics.json`` records (the last ``train_cpu_s``; None if none)."""
    return float(history[-1]["train_cpu_s"]) if history and "train_cpu_s" in history[-1] else None
