"""The pretraining probe (``seg.core.probe``): when it runs, what it logs, that it leaves pretraining as it was, and
its number against an independent Dice computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seg.core.config import load_experiment
from seg.core.errors import DataError
from seg.core.probe import Probe
from seg.core.pretrain import pretrain
from seg.core.synth import write_synthetic_dataset
from seg.core.train import LATEST

CPU = torch.device("cpu")


def _pretrain(data, out, probe_every: int):
    exp = load_experiment("smoke", ("pretrain.epochs=3", f"pretrain.probe_every={probe_every}", "pretrain.probe_steps=2"))
    pretrain(data=data, out=out, exp=exp, device="cpu")
    return json.loads((out / "metrics.json").read_text()), torch.load(out / LATEST, weights_only=True)["model"]


def test_probe_logs_on_its_epochs_and_leaves_pretraining_unchanged(synth_data, tmp_path):
    probed, probed_weights = _pretrain(synth_data, tmp_path / "probed", probe_every=2)
    assert ["probe_dice" in r for r in probed] == [False, True, True]  # every 2 epochs, and after the last
    assert all(0.0 <= r["probe_dice"] <= 1.0 for r in probed if "probe_dice" in r)
    assert "probe_dice" in (tmp_path / "probed" / "metrics.csv").read_text().splitlines()[0]
    plain, plain_weights = _pretrain(synth_data, tmp_path / "plain", probe_every=0)
    assert [r["loss"] for r in plain] == [r["loss"] for r in probed]  # its own random streams
    assert plain_weights.keys() == probed_weights.keys()
    for key, value in plain_weights.items():
        assert torch.equal(value, probed_weights[key]), key


class ConstantNet(torch.nn.Module):
    """Logits that favour class ``winner`` at every voxel, with a parameter for the optimizer."""

    def __init__(self, num_classes: int, winner: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[winner] = 5.0

    def forward(self, x):
        return self.bias[None, :, None, None, None].expand(x.shape[0], -1, *x.shape[2:]) + 0 * x


def test_probe_dice_is_the_mean_validation_dice_over_classes(synth_data, monkeypatch):
    exp = load_experiment("smoke", ("pretrain.probe_every=1", "finetune.optimizer.lr=0.0"))
    probe = Probe(exp, synth_data, CPU, torch.nn.Linear(1, 1), epochs=1)
    monkeypatch.setattr(probe, "network", lambda: ConstantNet(probe.num_classes, winner=1))
    # the network labels every voxel liver (1): by hand, per class, the Dice of that map on each validation case
    expect = []
    for c in range(1, probe.num_classes):
        per_case = []
        for case in probe.val:
            truth = np.asarray(case.label)
            if c == 1:
                per_case.append(2 * np.count_nonzero(truth == 1) / (np.count_nonzero(truth == 1) + truth.size))
            else:
                per_case.append(0.0 if (truth == c).any() else 1.0)
        expect.append(np.mean(per_case))
    assert probe(1) == {"probe_dice": pytest.approx(np.mean(expect), abs=1e-9)}
    assert probe.val and not set(c.name for c in probe.val) & set(c.name for c in probe.train)


def test_probe_starts_from_the_pretrained_backbone_and_follows_the_fine_tuning_cases(synth_data):
    from seg.core.model import build_backbone

    exp = load_experiment("smoke", ("pretrain.probe_every=1", 'finetune.cases=["synth_0000", "synth_0001"]'))
    backbone = build_backbone(exp.backbone, 1, 1)
    probe = Probe(exp, synth_data, CPU, backbone, epochs=1)
    assert {c.name for c in probe.train + probe.val} == {"synth_0000", "synth_0001"}
    source, network = backbone.state_dict(), probe.network().state_dict()
    shared = [k for k in network if k in source and source[k].shape == network[k].shape]
    assert len(shared) == len(network) - 2  # all but the output layer's weight and bias
    for key in shared:
        assert torch.equal(network[key], source[key]), key
    assert Probe.for_stage(load_experiment("smoke"), synth_data, CPU, backbone, epochs=1) is None  # off by default


def test_probe_needs_labeled_cases(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 0, 2, seed=0)
    exp = load_experiment("smoke", ("pretrain.probe_every=1",))
    with pytest.raises(DataError, match="pretrain.probe_every"):
        Probe(exp, tmp_path / "data", CPU, torch.nn.Linear(1, 1), epochs=1)
