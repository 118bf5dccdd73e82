"""Training dashboards: TensorBoard event files read back with TensorBoard's own EventAccumulator hold every
per-epoch figure of the training loop, progress.png is redrawn every epoch, only rank 0 writes, and a missing
optional package costs one info line."""

import json
import sys

import numpy as np
import pytest
import torch

from seg.core import dashboard, distributed
from seg.core.console import set_quiet
from seg.core.train import TrainingLoop, seed_everything

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
pytest.importorskip("matplotlib")

LABELS = json.dumps({"background": 0, "liver": 1, "left_kidney": 3})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run_dir/tensorboard`` as tag -> [(step, value)], read by TensorBoard's own reader."""
    accumulator = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def training_run(run_dir, epochs=3, seen=None):
    """A tiny TrainingLoop whose epochs report validation Dice for two organs and a probe figure; ``seen``
    collects progress.png's bytes as each epoch ends (before that epoch's own refresh)."""
    generator = seed_everything(3)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loop = TrainingLoop(run_dir=run_dir, module=model, optimizer=optimizer,
                        scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], 0.5), device=torch.device("cpu"),
                        epochs=epochs, steps_per_epoch=2, generator=generator, meta={"kind": "test", "labels": LABELS})

    def compute_loss():
        x = torch.from_numpy(generator.normal(size=(4, 3)).astype(np.float32))
        return torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), {"mse_part": 0.5}

    def on_epoch_end(epoch):
        if seen is not None:
            png = run_dir / "progress.png"
            seen.append(png.read_bytes() if png.exists() else None)
        return {"val_dice_1": 0.1 * epoch, "val_dice_3": 0.05 * epoch, "val_mean_dice": 0.075 * epoch,
                "probe_dice": 0.2 + 0.01 * epoch}

    loop.run(compute_loss, on_epoch_end=on_epoch_end)
    return loop


def test_event_files_hold_every_scalar_of_the_history(tmp_path):
    loop = training_run(tmp_path)
    got = events(tmp_path)
    assert set(got) >= {"train/loss", "train/mse_part", "train/lr", "val/dice_liver", "val/dice_left_kidney",
                        "val/mean_dice", "probe/probe_dice"}
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert history == loop.history and len(history) == 3
    tags = {key: dashboard.scalars({key: 0.0}, {1: "liver", 3: "left_kidney"}).popitem()[0] for key in history[0]
            if key != "epoch"}
    assert set(got) == set(tags.values())  # every number of the history, whatever the loop records
    for key, tag in tags.items():
        assert [step for step, _ in got[tag]] == [1, 2, 3], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [row[key] for row in history], rtol=1e-6)


def test_progress_png_is_redrawn_every_epoch(tmp_path):
    seen = []
    training_run(tmp_path, epochs=3, seen=seen)
    final = (tmp_path / "progress.png").read_bytes()
    assert seen[0] is None  # nothing before the first epoch ended
    drawn = seen[1:] + [final]  # after epochs 1, 2 and 3
    assert all(png.startswith(PNG_SIGNATURE) for png in drawn)
    assert len(set(drawn)) == 3
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(tmp_path / "progress.png").shape
    assert height > 400 and width > 600  # three panels
    assert not list(tmp_path.glob(".*"))


def test_only_rank_0_writes(tmp_path, monkeypatch):
    history = [{"epoch": 1, "lr": 1e-3, "loss": 1.0}]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    dashboard.update(tmp_path, history, LABELS)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    dashboard.update(tmp_path, history, LABELS)
    assert (tmp_path / "progress.png").exists() and events(tmp_path) == {"train/lr": [(1, pytest.approx(1e-3))],
                                                                          "train/loss": [(1, 1.0)]}


def test_a_resumed_run_rewrites_what_was_logged_after_its_checkpoint(tmp_path, monkeypatch):
    rows = [{"epoch": e, "lr": 1e-3, "loss": float(10 - e)} for e in (1, 2, 3)]
    dashboard.update(tmp_path, rows)
    monkeypatch.setattr(dashboard, "_writers", {})  # a new process resumes from the epoch-2 checkpoint
    dashboard.update(tmp_path, rows[:2])
    dashboard.update(tmp_path, rows[:2] + [{"epoch": 3, "lr": 1e-3, "loss": 5.5}])
    assert events(tmp_path)["train/loss"] == [(1, 9.0), (2, 8.0), (3, 5.5)]
    dashboard.update(tmp_path, rows[:1])  # the same process resumes from the epoch-1 checkpoint
    dashboard.update(tmp_path, rows[:1] + [{"epoch": 2, "lr": 1e-3, "loss": 7.25}])
    assert events(tmp_path)["train/loss"] == [(1, 9.0), (2, 7.25)]


def test_missing_packages_cost_one_info_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(dashboard, "_missing", set())
    set_quiet(False)
    history = []
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "lr": 1e-3, "loss": 1.0 / epoch})
        dashboard.update(tmp_path, history)
    err = capsys.readouterr().err.replace("\n", " ")
    assert err.count("pip install seg[tensorboard]") == 1 and err.count("pip install seg[report]") == 1, err
    assert list(tmp_path.iterdir()) == []
