"""The ``contrastive`` SSL task (plain MoCo) and the shared momentum-contrast machinery of ``seg.plugins.moco``."""

import math

import pytest
import torch
import torch.nn.functional as F

from seg.core import plugins
from seg.core.errors import ConfigError
from seg.plugins import moco
from seg.plugins.contrastive import Contrastive
from tests.test_pcrl import TinyUNet, smooth_volumes, train



def tiny_contrastive(**options) -> Contrastive:
    """A contrastive task on a ``TinyUNet`` with a 16-key queue and 16^3 crops (``options`` override)."""
    return Contrastive(TinyUNet(), **{"queue_size": 16, "crop_size": (16, 16, 16)} | options)


def test_registered_and_sharing_the_moco_machinery():
    assert plugins.get("ssl_tasks", "contrastive") is Contrastive
    assert issubclass(Contrastive, moco.MomentumContrast)
    task = Contrastive(TinyUNet())
    assert task.queue.keys.shape == (16384, 128) and task.temperature == 0.2 and task.momentum == 0.999


def test_step_trains_the_encoder_and_never_the_decoder():
    torch.manual_seed(0)
    task = tiny_contrastive()
    loss, metrics = task.training_step(smooth_volumes(3))
    assert set(metrics) == {"loss", "contrastive", "contrastive_acc"}
    loss.backward()
    params = dict(task.backbone.named_parameters())
    assert params["enc3.0.weight"].grad is not None and params["enc3.0.weight"].grad.abs().sum() > 0
    assert all(params[n].grad is None for n in params if n.startswith(("dec", "up", "head")))
    task.after_optimizer_step()
    assert int(task.queue.pointer) == 3


def test_accuracy_rises_above_chance_and_above_an_untrained_control():
    def mean_accuracy(lr):
        torch.manual_seed(0)  # same data and augmentations for both runs: only learning differs
        history = train(tiny_contrastive(momentum=0.9), lambda step: smooth_volumes(4, seed=step), 40, lr)
        return sum(h["contrastive_acc"] for h in history[20:]) / 20

    trained, control = mean_accuracy(1e-3), mean_accuracy(0.0)
    assert trained > 5 / 17 and trained > control + 0.1, (trained, control)


def test_momentum_update_by_hand():
    task = tiny_contrastive(momentum=0.75)
    with torch.no_grad():
        for p in task.backbone.parameters():
            p.fill_(3.0)
        for p in task.projection.parameters():
            p.fill_(-1.0)
        for p in task.momentum_backbone.parameters():
            p.fill_(1.0)
        for p in task.momentum_projection.parameters():
            p.fill_(1.0)
    task.after_optimizer_step()
    # 0.75 * 1 + 0.25 * 3 = 1.5 and 0.75 * 1 + 0.25 * (-1) = 0.5, exactly representable
    assert all(bool((p == 1.5).all()) for p in task.momentum_backbone.parameters())
    assert all(bool((p == 0.5).all()) for p in task.momentum_projection.parameters())
    assert all(bool((p == 3.0).all()) for p in task.backbone.parameters())
    online = [torch.tensor([2.0, 4.0])]
    target = [torch.tensor([0.0, 8.0])]
    moco.momentum_update(online, target, 0.9)
    torch.testing.assert_close(target[0], torch.tensor([0.9 * 0.0 + 0.1 * 2.0, 0.9 * 8.0 + 0.1 * 4.0]))


def test_queue_pointer_wraps_around():
    queue = moco.KeyQueue(5, 2)
    keys = torch.arange(2 * 12, dtype=torch.float32).reshape(12, 2)
    queue.enqueue(keys[:3])
    assert int(queue.pointer) == 3 and torch.equal(queue.keys[:3], keys[:3])
    queue.enqueue(keys[3:7])  # rows 3, 4, then 0, 1
    assert int(queue.pointer) == 2
    assert torch.equal(queue.keys, torch.stack([keys[5], keys[6], keys[2], keys[3], keys[4]]))
    queue.enqueue(keys[:7])  # more than the queue holds: the last 5 land as if enqueued one by one
    # one by one from pointer 2: rows 2,3,4,0,1,2,3 get keys 0..6, so row 2 -> 5, 3 -> 6, 4 -> 2, 0 -> 3, 1 -> 4
    assert int(queue.pointer) == (2 + 7) % 5
    assert torch.equal(queue.keys, torch.stack([keys[3], keys[4], keys[5], keys[6], keys[2]]))


def test_info_nce_by_hand():
    queue = moco.KeyQueue(3, 2)
    queue.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    loss, accuracy = queue.info_nce(q, k, temperature=0.5)
    expect = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        logits = [sum(a * b for a, b in zip(qi, key)) / 0.5 for key in [ki] + queue.keys.tolist()]
        expect -= logits[0] - math.log(sum(math.exp(v) for v in logits))
    assert float(loss) == pytest.approx(expect / 2, rel=1e-6)
    # sample 0: positive 0.6 < queue 1.0 (wrong); sample 1: positive 0 < queue 1.0 (wrong)
    assert float(accuracy) == 0.0
    _, accuracy = queue.info_nce(q, q, temperature=0.5)  # ties with the queue's equal keys count as first
    assert float(accuracy) == 1.0


def test_group_statistics_match_batch_norm_of_each_group():
    x = torch.randn(6, 3, 4, 5, 6, dtype=torch.float64)
    groups = torch.tensor([1, 0, 2, 1, 0, 2])
    sums = torch.stack([x.sum((2, 3, 4)), (x * x).sum((2, 3, 4))], dim=1)
    mean, var = moco.group_statistics(sums, groups, count=4 * 5 * 6, num_groups=3)
    for g in range(3):
        members = x[groups == g]
        torch.testing.assert_close(mean[g], members.mean((0, 2, 3, 4)))
        torch.testing.assert_close(var[g], members.var((0, 2, 3, 4), unbiased=False))
        shape = (1, 3, 1, 1, 1)
        normalised = (members - mean[g].reshape(shape)) / torch.sqrt(var[g] + 1e-5).reshape(shape)
        torch.testing.assert_close(normalised, F.batch_norm(members, None, None, training=True, eps=1e-5))


def test_probe_finds_deepest_channels_and_outputs():
    assert moco.probe_backbone(TinyUNet(width=4, out_channels=2)) == (16, 2)


# ---- several devices in one process: SplitBatchNorm (query) and shuffled groups (key) ------------------------

def _norm(cls, **kwargs):
    norm = cls(3, **kwargs)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    return norm


@pytest.mark.parametrize("batch, splits, members", [(6, 3, [[0, 1], [2, 3], [4, 5]]), (5, 2, [[0, 1, 2], [3, 4]]),
                                                    (2, 4, [[0], [1]])])
def test_split_batch_norm_normalises_each_group_with_its_own_statistics(batch, splits, members):
    x = torch.randn(batch, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    norm = _norm(moco.SplitBatchNorm, splits=splits)
    y = norm(x)
    expect = torch.empty_like(y)
    flat = x.detach().transpose(0, 1).reshape(3, -1)
    for group in members:  # by hand: mean and biased variance over the group's samples and voxels
        g = x.detach()[group]
        mean, var = g.mean((0, 2, 3, 4)), g.var((0, 2, 3, 4), unbiased=False)
        shape = (1, 3, 1, 1, 1)
        expect[group] = (g - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + 1e-5) * \
            norm.weight.detach().reshape(shape) + norm.bias.detach().reshape(shape)
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)
    # running statistics: those of the whole batch, as plain batch norm keeps them
    torch.testing.assert_close(norm.running_mean, 0.1 * flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * flat.var(1), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()  # gradients flow through each group's statistics
    reference = x.detach().clone().requires_grad_(True)
    torch.cat([F.batch_norm(reference[g], None, None, norm.weight, norm.bias, True, 0.0, 1e-5)
               for g in members]).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)
    norm.eval()
    plain = _norm(torch.nn.BatchNorm3d).eval()
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x.detach()), plain(x.detach()))


def test_bn_groups_split_the_online_backbone_per_process(monkeypatch):
    plain_keys = set(TinyUNet().state_dict())
    task = tiny_contrastive()  # default bn_groups = 4 (the official 4 GPUs), one process
    norms = [m for m in task.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, moco.SplitBatchNorm) and m.splits == 4 for m in norms)
    assert set(task.backbone.state_dict()) == plain_keys  # --init and fine-tuning load the same keys
    assert not any(isinstance(m, moco.SplitBatchNorm) for m in tiny_contrastive(bn_groups=1).backbone.modules())
    monkeypatch.setattr(moco, "world", lambda: (0, 2))
    assert {m.splits for m in tiny_contrastive().backbone.modules() if isinstance(m, moco.SplitBatchNorm)} == {2}
    monkeypatch.setattr(moco, "world", lambda: (0, 4))  # one group per device: plain batch norm per process
    assert not any(isinstance(m, moco.SplitBatchNorm) for m in tiny_contrastive().backbone.modules())
    with pytest.raises(ConfigError, match="bn_groups"):
        tiny_contrastive(bn_groups=0)


def test_key_encoder_groups_are_a_random_shuffle_of_the_batch():
    torch.manual_seed(0)
    task = tiny_contrastive(bn_groups=2)
    norm = next(m for m in task.momentum_backbone.modules() if isinstance(m, moco.ShuffledBatchNorm))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    seen = []
    norm.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.clone(), m.groups.clone())))
    x = smooth_volumes(4)
    for _ in range(12):
        task.key(x)
    groupings = set()
    for inputs, out, groups in seen:
        assert sorted(torch.bincount(groups).tolist()) == [2, 2]
        for g in range(2):
            members = groups == g
            torch.testing.assert_close(out[members], F.batch_norm(inputs[members], None, None, norm.weight,
                                                                  norm.bias, True, 0.0, 1e-5), rtol=1e-4, atol=1e-5)
        groupings.add(frozenset(frozenset(torch.nonzero(groups == g).flatten().tolist()) for g in range(2)))
    assert len(groupings) > 1  # shuffled anew every step, not the query's fixed consecutive groups
    assert norm.groups is None  # only for that forward pass
