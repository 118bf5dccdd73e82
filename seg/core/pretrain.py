"""The self-supervised stage: ``seg run pretrain``.

Random patches of unlabeled scans feed the experiment's SSL task, which owns the backbone (built with one
output channel: reconstruction tasks predict the image). The checkpoint's ``backbone.*`` weights are what
``seg run finetune --init`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from seg.core import distributed, plugins
from seg.core.config import Experiment, experiment_toml
from seg.core.console import log_to
from seg.core.data import unlabeled_cases
from seg.core.errors import ConfigError
from seg.core.inference import resolve_device
from seg.core.model import build_backbone, describe_backbone
from seg.core.modelfile import training_record
from seg.core.patches import sample_patch
from seg.core.probe import Probe
from seg.core.runs import open_run_dir
from seg.core.train import build_optimizer, seed_everything, stage_loop

PRETRAIN_OUTPUTS = 1


def pretrain(data: Path, out: Path, exp: Experiment | None, *, resume: bool = False, device: str = "auto",
             workers: int = 1, epochs: int | None = None) -> torch.nn.Module:
    """Pretrain ``exp``'s backbone with its SSL task on the unlabeled scans of ``data`` into ``out``; returns
    the SSL task (its ``backbone`` holds the pretrained weights)."""
    if exp is not None and exp.pretrain is None:
        raise ConfigError(f"experiment {exp.name!r} has no pretraining stage (pretrain = false)")
    exp = open_run_dir(out, exp, resume)
    dev = resolve_device(device)
    distributed.init_from_env(dev)
    cfg = exp.pretrain
    with log_to(Path(out) / "log.txt"):
        dataset, cases = unlabeled_cases(Path(data), exp, workers)
        generator = seed_everything(exp.seed + distributed.rank())
        backbone = build_backbone(exp.backbone, 1, PRETRAIN_OUTPUTS)
        task = plugins.get("ssl_tasks", cfg.ssl.name)(backbone, **cfg.ssl.options).to(dev)
        model = task
        if distributed.world_size() > 1:
            # some tasks leave parts of the backbone unused (plain contrastive learning never decodes)
            model = torch.nn.parallel.DistributedDataParallel(task, find_unused_parameters=True,
                                                              broadcast_buffers=False)  # queues agree by construction
        optimizer = build_optimizer([p for p in task.parameters() if p.requires_grad], cfg.optimizer)
        meta = {"kind": "pretrain", "config": experiment_toml(exp), "ssl": cfg.ssl.name,
                "backbone": describe_backbone(exp.backbone, 1, PRETRAIN_OUTPUTS),
                "labels": json.dumps(dataset.labels), **training_record(exp, dataset)}
        loop = stage_loop(cfg, cases=len(cases), run_dir=out, module=model, optimizer=optimizer, device=dev,
                          generator=generator, meta=meta, epochs=epochs)
        if resume:
            loop.resume()

        def compute_loss():
            patches = []
            for _ in range(cfg.batch_size):
                case = cases[int(generator.integers(len(cases)))]
                patch, _ = sample_patch(np.asarray(case.image), None, cfg.patch_size, generator)
                patches.append(patch)
            return model(torch.from_numpy(np.stack(patches))[:, None].to(dev))

        probe = Probe.for_stage(exp, Path(data), dev, task.backbone, loop.epochs, workers)  # probe_dice; None: off
        loop.run(compute_loss, after_step=task.after_optimizer_step, on_epoch_end=probe,
                 description=f"pretraining ({cfg.ssl.name})")
    distributed.barrier()
    return task
