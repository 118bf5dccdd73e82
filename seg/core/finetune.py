"""The supervised stage: ``seg run finetune``.

Patches as in the paper (whole slices, a random run of slices along the body axis, each holding some
foreground; optionally class-aware, ``seg.core.patches``) made in a background thread, augmented on the
training device (``seg.core.augment``), the configured loss, optimizer, schedule and precision (the forward
pass only: augmentation and loss stay float32, ``seg.core.train``), validation on held-out
cases through the real inferer every ``val_every`` epochs, ``checkpoint_latest`` / ``checkpoint_best``.
With ``ema`` the model validated, selected and shipped is a moving average of the weights
(``seg.core.averaging``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from seg.core import distributed, plugins
from seg.core.augment import augment_batch
from seg.core.averaging import WeightAverage
from seg.core.config import Experiment, experiment_toml
from rich.table import Table

from seg.core.console import console, info, is_quiet, log_to
from seg.core.data import labeled_cases
from seg.core.errors import ConfigError
from seg.core.inference import class_argmax, resolve_device
from seg.core.metrics import dice
from seg.core.model import build_backbone, describe_backbone, load_pretrained
from seg.core.modelfile import training_record
from seg.core.patches import LabeledPatches
from seg.core.runs import open_run_dir
from seg.core.train import BEST, build_optimizer, full_precision, seed_everything, stage_loop


def split_cases(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic train/validation split; with a single case, it is used for both."""
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    if len(order) < 2:
        return order, order
    n_val = min(len(order) - 1, max(1, round(fraction * len(order))))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _named(cases: list, names: list[str], data: Path, option: str) -> list:
    known = {c.name for c in cases}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"{option}: no labeled case {missing[0]!r} in {data}")
    return [c for c in cases if c.name in set(names)]


def chosen_cases(cases: list, names: list[str], data: Path) -> list:
    """The labeled ``cases`` that ``finetune.cases`` names (all of them when it is empty: a label budget is a
    subset)."""
    return _named(cases, names, data, "finetune.cases") if names else cases


def training_and_validation(cases: list, cfg, data: Path, seed: int) -> tuple[list, list]:
    """The training and validation cases of a fine-tuning run (``cfg``: the experiment's ``finetune``).

    With ``finetune.val_cases``, those validate and are kept out of training, which takes ``finetune.cases``
    (every other labeled case when it is empty); without, the validation cases are a ``val_fraction`` split of
    ``finetune.cases`` (:func:`split_cases`).
    """
    if not cfg.val_cases:
        chosen = chosen_cases(cases, cfg.cases, data)
        train_names, val_names = split_cases([c.name for c in chosen], cfg.val_fraction, seed)
        return [c for c in chosen if c.name in train_names], [c for c in chosen if c.name in val_names]
    val = _named(cases, cfg.val_cases, data, "finetune.val_cases")
    both = sorted(set(cfg.cases) & set(cfg.val_cases))
    if both:
        raise ConfigError(f"finetune.val_cases: {both[0]!r} is also in finetune.cases; validation cases are kept "
                          "out of training")
    train = chosen_cases(cases, cfg.cases, data) if cfg.cases else [c for c in cases if c.name not in set(cfg.val_cases)]
    if not train:
        raise ConfigError(f"finetune.val_cases: every labeled case of {data} is a validation case; none is left "
                          "to train on")
    return train, val


def validate(network, cases, inferer, device, num_classes: int) -> dict[str, float]:
    """Mean Dice per class value over ``cases`` (preprocessed grid), through the experiment's inferer."""
    network.eval()
    scores = {c: [] for c in range(1, num_classes)}
    for case in cases:
        image = torch.from_numpy(np.asarray(case.image, dtype=np.float32))[None, None]
        labels = class_argmax(inferer(network, image, device=device, precision="fp32")).numpy()
        truth = np.asarray(case.label)
        for c in scores:
            scores[c].append(dice(labels == c, truth == c))
    return {f"val_dice_{c}": float(np.mean(v)) for c, v in scores.items()}


def show_validation(history: list[dict], organ_names: dict[int, str]) -> None:
    """Print the last validation's per-organ Dice as a rich table."""
    rows = [r for r in history if "val_mean_dice" in r]
    if not rows:
        return
    last = rows[-1]
    table = Table("organ", "Dice", title=f"validation Dice at epoch {last['epoch']}")
    for value, name in sorted(organ_names.items()):
        if f"val_dice_{value}" in last:
            table.add_row(name, f"{last[f'val_dice_{value}']:.3f}")
    table.add_row("[bold]mean", f"[bold]{last['val_mean_dice']:.3f}")
    if not is_quiet():
        console.print(table)


def finetune(data: Path, out: Path, exp: Experiment | None, *, init: Path | None = None, resume: bool = False,
             device: str = "auto", workers: int = 1, epochs: int | None = None) -> torch.nn.Module:
    """Fine-tune ``exp``'s backbone on the labeled cases of ``data`` into the run folder ``out``; returns the
    trained network (the run folder holds its checkpoints)."""
    exp = open_run_dir(out, exp, resume)
    dev = resolve_device(device)
    distributed.init_from_env(dev)
    with log_to(Path(out) / "log.txt"):
        dataset, cases = labeled_cases(Path(data), exp, workers)
        cfg = exp.finetune
        train, val = training_and_validation(cases, cfg, data, exp.seed)
        generator = seed_everything(exp.seed + distributed.rank())
        info(f"fine-tuning on {len(train)} cases, validating on {len(val)}: {', '.join(c.name for c in val)}")
        num_classes = dataset.num_classes
        network = build_backbone(exp.backbone, 1, num_classes).to(dev)
        described = describe_backbone(exp.backbone, 1, num_classes)
        if init is not None and not resume:
            load_pretrained(network, Path(init), described)
        model = network
        if distributed.world_size() > 1:
            model = torch.nn.parallel.DistributedDataParallel(network)
        loss_fn = plugins.get("losses", cfg.loss.name)(num_classes, **cfg.loss.options)
        inferer = plugins.get("inferers", exp.predict.inferer.name)(**exp.predict.inferer.options)
        optimizer = build_optimizer(network.parameters(), cfg.optimizer)
        meta = {"kind": "finetune", "config": experiment_toml(exp), "backbone": described,
                "labels": json.dumps(dataset.labels), **training_record(exp, dataset)}
        average = WeightAverage(network, cfg.ema) if cfg.ema else None
        scored = average.network if average else network  # the network validated, selected and returned
        loop = stage_loop(cfg, cases=len(train), run_dir=out, module=model, optimizer=optimizer, device=dev,
                          generator=generator, meta=meta, epochs=epochs, average=average)
        info(f"training at {loop.precision}")
        best = {"score": -1.0}
        if resume:
            loop.resume()
            best["score"] = max([r.get("val_mean_dice", -1.0) for r in loop.history] + [-1.0])

        patches = LabeledPatches(train, cfg.patch_size, cfg.class_share, generator)

        def make_batch():
            return (*patches.batch(cfg.batch_size), int(generator.integers(2**62)))

        def compute_loss(batch):
            images, labels, seed = batch
            x, y = torch.from_numpy(images).to(dev), torch.from_numpy(labels).to(dev)
            with full_precision(dev):
                x, y = augment_batch(x, y, cfg.augment, seed)
            logits = model(x)  # at the loop's precision
            with full_precision(dev):
                return loss_fn(logits.float(), y), {}

        def on_epoch_end(epoch: int):
            if epoch % cfg.val_every and epoch != loop.epochs:
                return None
            scores = validate(scored, val, inferer, dev, num_classes)
            scores["val_mean_dice"] = float(np.mean(list(scores.values())))
            if scores["val_mean_dice"] > best["score"]:
                best["score"] = scores["val_mean_dice"]
                loop.save(BEST)
            return scores

        loop.run(compute_loss, on_epoch_end=on_epoch_end, description="fine-tuning", batches=make_batch)
        if not (Path(out) / BEST).exists():
            loop.save(BEST)
        if distributed.is_main():
            show_validation(loop.history, dataset.organ_names)
    distributed.barrier()
    return scored
