"""Momentum contrast machinery shared by the ``pcrl`` and ``contrastive`` SSL tasks (MoCo, He et al. 2020).

- ``MomentumContrast``: the base task. It owns the backbone (query encoder), a projection head, a momentum
  copy of the backbone's encoder and head (EMA of the online ones, never trained by gradient), and a
  ``KeyQueue`` of past keys; all are module parameters or buffers, so ``state_dict`` checkpoints them.
- InfoNCE against the queue with temperature; "contrastive_acc" is the fraction of samples whose positive
  key scores above every queued key.
- ``after_optimizer_step`` applies the momentum update and enqueues the step's keys, gathered from all ranks
  (``concat_all_gather``) so the queue is identical everywhere.

Batch-norm leakage. Query and key statistics must not come from the same samples, or the network can match
a query to its key through batch statistics (MoCo, section 3.3). We use MoCo's shuffle-BN, not
SyncBatchNorm: SyncBatchNorm only runs on GPUs (CPU/gloo DDP fails) and computes the query's and the key's
statistics over the same global set of samples, which is the leak itself. MoCo's shuffle moves the key
branch's *inputs* between ranks and its *outputs* back; PCRL's hybrid decoder needs the key encoder's whole
feature maps, so instead every batch-norm layer of the key encoder (``ShuffledBatchNorm``) exchanges only
per-sample channel sums and normalises each sample with the statistics of the group it would share a rank
with after the shuffle: the same arithmetic at a few floats per sample.

Several devices in one process. On one device shuffle-BN has nothing to shuffle between, so the query's and
the key's statistics would come from the same samples. ``bn_groups`` emulates that many devices, as MoCo's
single-GPU reference (``SplitBatchNorm``) does: every batch norm of the online backbone normalises each of
``bn_groups / world size`` consecutive groups of the local batch with the group's own statistics
(``SplitBatchNorm``), and the key encoder's groups are a random shuffle of the global batch
(``ShuffledBatchNorm``), so a query's group and its key's group share only the sample itself. Running
statistics follow the whole batch in both (what plain batch norm would record). The official code ran on 4
GPUs under ``DataParallel`` (4 groups): ``bn_groups = 4``; 1 is plain batch norm in one process.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seg.core.backbone import EncoderDecoder
from seg.core.errors import ConfigError, SegError
from seg.core.ssl import SSLTask


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from every rank concatenated along dim 0 in rank order (itself in one process)."""
    _, size = world()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def momentum_update(online: list[torch.Tensor], target: list[torch.Tensor], momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, tensor by tensor, in place."""
    if target:
        torch._foreach_lerp_(target, online, 1.0 - momentum)


class ProjectionHead(nn.Module):
    """Global average pooling, then Linear-ReLU-Linear to ``dim`` (the official ``fc1``/``fc2``, 128-d)."""

    def __init__(self, in_channels: int, dim: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) feature map -> (B, dim) embedding (not normalised)."""
        return self.fc2(F.relu(self.fc1(features.mean(dim=tuple(range(2, features.dim()))))))


class KeyQueue(nn.Module):
    """A ring buffer of ``size`` L2-normalised keys of ``dim`` floats, with the InfoNCE loss against it."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        start = torch.randn(size, dim, generator=torch.Generator().manual_seed(0))  # the same on every rank
        self.register_buffer("keys", F.normalize(start, dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` (N, dim), wrapping around the end."""
        size = self.keys.shape[0]
        start = int(self.pointer)
        if keys.shape[0] > size:
            start = (start + keys.shape[0] - size) % size
            keys = keys[-size:]
        rows = (start + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys[rows] = keys.to(self.keys)
        self.pointer.fill_((start + keys.shape[0]) % size)

    def info_nce(self, q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of normalised queries ``q`` against their keys ``k`` (positives, no gradient) and the
        queue (negatives). Returns (loss, fraction of queries whose positive scores highest). Runs in fp32."""
        q = q.float()
        with torch.autocast(q.device.type, enabled=False):
            positive = (q * k.detach().float()).sum(dim=1, keepdim=True)
            negative = q @ self.keys.detach().clone().t()  # a copy: the queue may change before backward
        logits = torch.cat([positive, negative], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
        return F.cross_entropy(logits, target), accuracy


def group_statistics(sums: torch.Tensor, groups: torch.Tensor, count: int, num_groups: int):
    """Batch-norm statistics of groups of samples from per-sample sums.

    ``sums`` (N, 2, C): per sample and channel, the sum and the sum of squares of its ``count`` values;
    ``groups`` (N,): each sample's group. Returns (mean, biased variance), each (num_groups, C).
    """
    totals = torch.zeros(num_groups, *sums.shape[1:], dtype=torch.float64, device=sums.device)
    totals.index_add_(0, groups, sums.double())
    n = torch.bincount(groups, minlength=num_groups).to(totals)[:, None] * count
    mean = totals[:, 0] / n
    return mean, (totals[:, 1] / n - mean * mean).clamp_min(0.0)


@torch.no_grad()
def update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         count: int) -> None:
    """``norm``'s running statistics after a batch of ``count`` values per channel with this ``mean`` and
    biased ``var``, as ``torch``'s batch norm updates them (unbiased variance; ``momentum = None``: average)."""
    norm.num_batches_tracked += 1
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean.to(norm.running_mean), factor)
    norm.running_var.lerp_((var * count / max(count - 1, 1)).to(norm.running_var), factor)


class ShuffledBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm of the key encoder: each sample is normalised with the statistics of its shuffle group
    (``groups`` over the global batch, set by ``MomentumContrast.key`` for one forward pass; see the module doc).

    Running statistics follow the whole global batch, so they stay identical on every rank. Without
    ``groups`` (evaluation, or one group in all) it is plain batch norm.
    """

    groups: torch.Tensor | None = None
    num_groups: int | None = None  # None: groups.max() + 1

    def _check_input_dim(self, input):
        if input.dim() < 3:
            raise ValueError(f"expected an input with spatial dimensions, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (B, C, ...) with shuffle-group statistics (see the class doc)."""
        if self.groups is None or not self.training:
            return super().forward(x)
        rank, _ = world()
        dims = tuple(range(2, x.dim()))
        xf = x.float()
        local = torch.stack([xf.sum(dims), (xf * xf).sum(dims)], dim=1)
        count = xf[0, 0].numel()
        every = concat_all_gather(local)
        num_groups = self.num_groups or int(self.groups.max()) + 1
        mean, var = group_statistics(every, self.groups, count, num_groups)
        mine = self.groups[rank * x.shape[0]:(rank + 1) * x.shape[0]]
        shape = (x.shape[0], x.shape[1]) + (1,) * len(dims)
        scale = torch.rsqrt(var[mine] + self.eps).float()
        out = (xf - mean[mine].float().reshape(shape)) * scale.reshape(shape)
        if self.affine:
            out = out * self.weight.reshape((1, -1) + (1,) * len(dims)) + self.bias.reshape((1, -1) + (1,) * len(dims))
        if self.track_running_stats:
            total, n = every.double().sum(0), count * every.shape[0]
            global_mean = total[0] / n
            update_running_stats(self, global_mean, (total[1] / n - global_mean ** 2).clamp_min(0.0), n)
        return out.to(x.dtype)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm that in training normalises each of ``splits`` consecutive groups of the batch with the
    group's own statistics, as that many devices would (MoCo's single-GPU ``SplitBatchNorm``; a batch smaller
    than ``splits`` is one sample per group). Running statistics follow the whole batch; in evaluation, or with
    ``splits = 1``, it is plain batch norm."""

    def __init__(self, num_features: int, splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = int(splits)

    def _check_input_dim(self, input):
        if input.dim() < 3:
            raise ValueError(f"expected an input with spatial dimensions, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (B, C, ...) group by group (see the class doc)."""
        if not self.training or self.splits < 2 or x.shape[0] < 2:
            return super().forward(x)
        parts = x.tensor_split(min(self.splits, x.shape[0]))
        out = torch.cat([F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps) for part in parts])
        if self.track_running_stats:
            with torch.no_grad():
                dims = (0, *range(2, x.dim()))
                xf = x.detach().float()
                update_running_stats(self, xf.mean(dims), xf.var(dims, unbiased=False), xf.numel() // xf.shape[1])
        return out


def _norm_copy(bn: nn.modules.batchnorm._BatchNorm, cls, **extra) -> nn.modules.batchnorm._BatchNorm:
    device = next(iter(bn.state_dict().values()), torch.empty(0)).device
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device=device, **extra)
    new.load_state_dict(bn.state_dict())
    return new


def replace_batch_norms(module: nn.Module, make) -> None:
    """Replace every batch-norm layer inside ``module`` by ``make(layer)``, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, make(child))


def split_batch_norms(module: nn.Module, splits: int) -> None:
    """Make every batch norm of ``module`` a ``SplitBatchNorm`` of ``splits`` groups (same weights, buffers
    and ``state_dict`` keys)."""
    replace_batch_norms(module, lambda bn: _norm_copy(bn, SplitBatchNorm, splits=splits))


def momentum_encoder(backbone: nn.Module) -> nn.Module:
    """A frozen copy of ``backbone`` without its decoder, its batch norms made ``ShuffledBatchNorm``."""
    twin = copy.deepcopy(backbone)
    keep = set(backbone.encoder_modules())
    for name, _ in list(twin.named_children()):
        if name not in keep:
            delattr(twin, name)
    replace_batch_norms(twin, lambda bn: _norm_copy(bn, ShuffledBatchNorm))
    twin.requires_grad_(False)
    return twin


def probe_backbone(backbone: nn.Module) -> tuple[int, int]:
    """(channels of the deepest feature map, output channels), from a dummy forward in eval mode."""
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for side in (16, 32, 64, 128):
                try:
                    features = backbone.encode(torch.zeros(1, 1, side, side, side, device=device))
                    output = backbone.decode(features)
                except (RuntimeError, ValueError, SegError):  # too small for this backbone: try a bigger cube
                    continue
                return int(features[-1].shape[1]), int(output.shape[1])
    finally:
        backbone.train(was_training)
    raise ConfigError(f"backbone {type(backbone).__name__}: encode/decode failed on every cube from 16 to 128 voxels")


def check_positive(task: str, **values) -> None:
    """Raise ``ConfigError`` naming the first option that is not a positive number."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"ssl task {task!r}: option {name} must be a positive number, got {value!r}")


def check_non_negative(task: str, **values) -> None:
    """Raise ``ConfigError`` naming the first option that is not a number >= 0."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"ssl task {task!r}: option {name} must be a number >= 0, got {value!r}")


#: when a step's keys enter the queue: after the optimizer step (every term reads the queue as it was before
#: the step), or right after each contrastive term (the official code's order)
ENQUEUE = ("after_step", "between_terms")


class MomentumContrast(SSLTask):
    """Base of the momentum-contrast tasks: query/key encoders, projection heads, key queue and updates."""

    task_name = "contrastive"

    def __init__(self, backbone: nn.Module, *, queue_size: int, temperature: float, momentum: float,
                 projection_dim: int, bn_groups: int = 4, enqueue: str = "after_step"):
        if not isinstance(backbone, EncoderDecoder):
            raise ConfigError(f"ssl task {self.task_name!r} needs a backbone with encode/decode/encoder_modules "
                              f"(seg.core.backbone.EncoderDecoder); {type(backbone).__name__} has not")
        if enqueue not in ENQUEUE:
            raise ConfigError(f"ssl task {self.task_name!r}: option enqueue must be one of {', '.join(ENQUEUE)}, "
                              f"got {enqueue!r}")
        for name, value in (("queue_size", queue_size), ("projection_dim", projection_dim), ("bn_groups", bn_groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ssl task {self.task_name!r}: option {name} must be a positive integer, "
                                  f"got {value!r}")
        check_positive(self.task_name, temperature=temperature)
        check_non_negative(self.task_name, momentum=momentum)
        if momentum >= 1:
            raise ConfigError(f"ssl task {self.task_name!r}: option momentum must be below 1, got {momentum!r}")
        super().__init__(backbone)
        self.deepest_channels, self.output_channels = probe_backbone(backbone)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.projection = ProjectionHead(self.deepest_channels, projection_dim)
        self.momentum_backbone = momentum_encoder(backbone)
        self.momentum_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.queue = KeyQueue(queue_size, projection_dim)
        self._shuffled_norms = [m for m in self.momentum_backbone.modules() if isinstance(m, ShuffledBatchNorm)]
        self._pending_keys: torch.Tensor | None = None
        self.enqueue = enqueue
        self.bn_splits = max(1, bn_groups // world()[1])  # groups of each process's batch (module doc)
        if self.bn_splits > 1:
            split_batch_norms(self.backbone, self.bn_splits)

    def query(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The online encoder's feature maps of ``x`` and its (unnormalised) projection."""
        features = self.backbone.encode(x)
        return features, self.projection(features[-1])

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The momentum encoder's feature maps of ``x`` and its (unnormalised) projection, under shuffle-BN:
        the global batch shuffled into (world size x ``bn_splits``) groups (module doc)."""
        rank, size = world()
        total = size * x.shape[0]
        num_groups = size * min(self.bn_splits, x.shape[0])
        if num_groups > 1 and self._shuffled_norms:
            if size == 1:
                order = torch.randperm(total, device=x.device)
            else:
                order = torch.randperm(total, device=x.device) if rank == 0 \
                    else torch.empty(total, dtype=torch.long, device=x.device)
                dist.broadcast(order, src=0)
            groups = torch.empty_like(order)
            groups[order] = torch.arange(total, device=x.device) * num_groups // total
            for norm in self._shuffled_norms:
                norm.groups, norm.num_groups = groups, num_groups
        try:
            features = self.momentum_backbone.encode(x)
        finally:
            for norm in self._shuffled_norms:
                norm.groups = norm.num_groups = None
        return features, self.momentum_projection(features[-1])

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of query projections against key projections and the queue: (loss, accuracy). With
        ``enqueue = "between_terms"`` (the official order) ``k`` enters the queue right after, so the next
        term of the same step reads it as negatives."""
        result = self.queue.info_nce(F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1), self.temperature)
        if self.enqueue == "between_terms":
            self.queue.enqueue(self._gathered(k))
        return result

    def _gathered(self, *keys: torch.Tensor) -> torch.Tensor:
        return concat_all_gather(torch.cat([F.normalize(k.detach().float(), dim=1) for k in keys]))

    def remember_keys(self, *keys: torch.Tensor) -> None:
        """Keep this step's key projections (normalised, gathered from all ranks) for the queue update after the
        optimizer step (``enqueue = "after_step"``; with ``"between_terms"`` ``contrast`` has enqueued them)."""
        if self.enqueue == "after_step":
            self._pending_keys = self._gathered(*keys)

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(online, momentum) parameters, matched by name: the encoder's and the projection head's."""
        online = dict(self.backbone.named_parameters())
        target = list(self.momentum_backbone.named_parameters())
        pairs = [(online[name], p) for name, p in target]
        pairs += list(zip(self.projection.parameters(), self.momentum_projection.parameters()))
        return [a.detach() for a, _ in pairs], [b for _, b in pairs]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Momentum update of the key encoder and head, then enqueue the last step's keys."""
        online, target = self.momentum_pairs()
        momentum_update(online, target, self.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(self._pending_keys)
            self._pending_keys = None
