"""An exponential moving average of a network's weights (``finetune.ema``): the model validated and shipped.

With decay ``d`` the average starts as a copy of the network and follows it after every optimizer step::

    A_0 = W_0,    A_t = d_t * A_(t-1) + (1 - d_t) * W_t,    d_t = min(d, t / (t + 9))

for every parameter and floating-point buffer (batch norm's running statistics); other buffers (batch
norm's step counter) are copied. ``1 / (1 - d)`` steps is the average's memory: 0.99 remembers about 100.
The warm-up ``t / (t + 9)`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) keeps the memory
no longer than the run so far, so the random initial weights do not linger: without it, 0.995 would still
hold 22 % of them after 300 steps.

Why: on a few labeled cases the raw weights' validation Dice moves a point or more between checks while the
learning rate is still high (docs/study/README.md), so model selection and the convergence check read noise;
the average is what the weights oscillate around. Polyak averaging as timm's ``ModelEmaV2`` does it
(``torch.optim.swa_utils.AveragedModel`` would also average integer buffers).
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch


def _tensors(network: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from network.parameters()
    yield from network.buffers()


class WeightAverage:
    """The moving average of ``network``'s weights with decay ``decay`` (module docstring); ``.network`` is a
    copy of the network, in eval mode and without gradients, that holds it."""

    def __init__(self, network: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay {decay}: expected 0 <= decay < 1")
        self.decay = decay
        self.updates = 0
        self.network = copy.deepcopy(getattr(network, "module", network)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        """Move the average towards ``network``'s current weights (call after each optimizer step)."""
        network = getattr(network, "module", network)  # unwrap DistributedDataParallel
        self.updates += 1
        decay = min(self.decay, self.updates / (self.updates + 9))
        for average, current in zip(_tensors(self.network), _tensors(network), strict=True):
            if average.is_floating_point():
                average.lerp_(current.detach(), 1.0 - decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict:
        """The averaged weights, as the network's own ``state_dict``."""
        return self.network.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore averaged weights saved by :meth:`state_dict`."""
        self.network.load_state_dict(state)
