"""Training dashboards a person can watch from another machine: TensorBoard event files and ``progress.png``.

``update(run_dir, history, labels)`` runs after every epoch with the run's whole per-epoch history (the rows
of ``metrics.json``: ``epoch``, ``lr``, the step metrics averaged over the epoch, ``val_dice_<value>`` and
``val_mean_dice`` where validated, any ``probe_*`` figure) and ``labels`` (``dataset.json``'s name -> value,
for organ names). Only rank 0 writes. Both outputs are optional extras; without a package, one info line
says what to install and the run goes on.

- ``RUN/tensorboard/`` (``pip install seg[tensorboard]``): one scalar per number and epoch (step = epoch),
  tagged ``train/<key>`` (losses, step metrics, ``train/lr``), ``val/dice_<organ>``, ``val/mean_dice`` and
  ``probe/<key>``. The folder mirrors the history: the first update of a process (a new run, or a resumed
  one whose last epochs were never checkpointed) rewrites it from the history, later ones append the new
  epochs. Watch it with ``tensorboard --logdir RUN`` (or a folder of runs).
- ``RUN/progress.png`` (``pip install seg[report]``, matplotlib; nnU-Net's habit): per epoch, the
  training losses, Dice and accuracies (validation Dice per organ and their mean, probes), the learning rate,
  and where the loop records them, the seconds of training steps (its ``*_s`` running totals, differenced);
  replaced atomically every epoch (about half a second of drawing on a 2-core machine).
"""

from __future__ import annotations

import json
import numbers
import shutil
from pathlib import Path

from rich.markup import escape

from seg.core import distributed
from seg.core.console import info
from seg.core.io import atomic_path

TENSORBOARD_DIR = "tensorboard"
PROGRESS_PNG = "progress.png"
PANELS = ("training losses", "Dice and accuracy", "learning rate", "seconds per epoch")

_writers: dict[Path, tuple[object, list[dict]]] = {}  # run folder -> (SummaryWriter, the rows it holds)
_missing: set[str] = set()  # packages already reported missing by this process


def update(run_dir: Path, history: list[dict], labels: dict | str | None = None) -> None:
    """Refresh ``run_dir``'s TensorBoard events and ``progress.png`` from ``history`` (rank 0 only)."""
    if not distributed.is_main() or not history:
        return
    names = _organ_names(labels)
    write_tensorboard(Path(run_dir), history, names)
    write_progress_png(Path(run_dir) / PROGRESS_PNG, history, names)


def scalars(row: dict, names: dict[int, str]) -> dict[str, float]:
    """The TensorBoard tag and value of every number of one history row but its epoch."""
    tags = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        tags[_tag(key, names)] = float(value)
    return tags


def write_tensorboard(run_dir: Path, history: list[dict], names: dict[int, str]) -> None:
    """Append the epochs of ``history`` that ``run_dir/tensorboard`` lacks (rewrite it if they disagree)."""
    for other in [d for d in _writers if d != run_dir]:  # one run at a time: let the last one's file go
        _writers.pop(other)[0].close()
    writer, written = _writers.get(run_dir, (None, None))
    if writer is None or history[:len(written)] != written:
        if writer is not None:
            _writers.pop(run_dir)[0].close()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _report_missing("tensorboard", "TensorBoard event files", "tensorboard")
            return
        folder = run_dir / TENSORBOARD_DIR
        shutil.rmtree(folder, ignore_errors=True)  # what a killed process logged after its last checkpoint
        writer, written = SummaryWriter(str(folder)), []
    for row in history[len(written):]:
        for tag, value in scalars(row, names).items():
            writer.add_scalar(tag, value, global_step=int(row["epoch"]))
    writer.flush()
    _writers[run_dir] = (writer, [dict(row) for row in history])


def write_progress_png(path: Path, history: list[dict], names: dict[int, str]) -> None:
    """Plot the history (module docstring) to ``path``, replacing it atomically."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch in the caller
    except ImportError:
        _report_missing("matplotlib", PROGRESS_PNG, "report")
        return
    panels = {title: {} for title in PANELS}
    previous = {}
    for row in history:
        for tag, value in scalars(row, names).items():
            panel = _panel(tag)
            if panel is None:
                continue
            if panel == "seconds per epoch":  # running totals: plot each epoch's share
                value, previous[tag] = value - previous.get(tag, 0.0), value
            panels[panel].setdefault(tag, []).append((row["epoch"], value))
    panels = {title: series for title, series in panels.items() if series}
    fig = Figure(figsize=(10, 2.4 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels.items()):
        for tag, points in series.items():
            epochs, values = zip(*points)
            bold = tag in ("train/loss", "val/mean_dice")
            ax.plot(epochs, values, marker="." if len(points) < 30 else None, linewidth=2.2 if bold else 1,
                    color="black" if bold else None, linestyle="--" if tag.startswith("probe/") else "-",
                    label=tag.split("/", 1)[1])
        if title == "learning rate" and all(v > 0 for points in series.values() for _, v in points):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1, 0].set_xlabel("epoch")
    fig.subplots_adjust(left=0.08, right=0.78, top=1 - 0.3 / len(panels), bottom=0.45 / len(panels), hspace=0.35)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")  # a fixed layout: a "tight" one draws everything twice


def _panel(tag: str) -> str | None:
    """The progress.png panel of a TensorBoard tag (None: not plotted)."""
    key = tag.split("/", 1)[1]
    if tag == "train/lr":
        return "learning rate"
    if not tag.startswith("train/") or "acc" in key:
        return "Dice and accuracy"
    if key.endswith("_s"):
        return "seconds per epoch"  # the loop's running totals of training time
    if key == "data_wait":
        return None  # TensorBoard only
    return "training losses"


def _tag(key: str, names: dict[int, str]) -> str:
    if key.startswith("val_dice_") and key[9:].isdigit():
        return f"val/dice_{names.get(int(key[9:]), key[9:])}"
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("probe"):
        return f"probe/{key}"
    return f"train/{key}"


def _organ_names(labels: dict | str | None) -> dict[int, str]:
    """Label value -> name from ``dataset.json``'s labels (a dict, or its JSON text as checkpoints keep it)."""
    if isinstance(labels, str):
        labels = json.loads(labels)
    return {int(value): name for name, value in (labels or {}).items()}


def _report_missing(package: str, what: str, extra: str) -> None:
    if package not in _missing:
        _missing.add(package)
        info(escape(f"no {what} (pip install seg[{extra}] adds {package})"))
