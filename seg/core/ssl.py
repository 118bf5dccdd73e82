"""The SSL pretext task contract (family ``ssl_tasks``).

``factory(backbone, **options) -> SSLTask``. An ``SSLTask`` is a ``torch.nn.Module`` that owns the
backbone as ``self.backbone`` plus whatever else it trains or keeps (momentum encoders, projection heads,
queues as buffers, so they are checkpointed with ``state_dict``). The pretraining loop calls:

- ``training_step(batch) -> (loss, metrics)`` (``forward`` calls it, so DDP can wrap the task) with ``batch`` a float tensor (B, 1, D, H, W) of
  preprocessed unlabeled patches; ``metrics`` maps names to floats for logging;
- ``after_optimizer_step()`` after each optimizer step (momentum updates, queue updates);
- ``backbone.state_dict()`` is what ``seg run finetune --init`` loads.
"""

from __future__ import annotations

import torch


class SSLTask(torch.nn.Module):
    """Base class for pretext tasks; subclasses implement ``training_step``."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def training_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss to minimise and metrics to log for one batch of unlabeled patches."""
        raise NotImplementedError

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Same as ``training_step``: DistributedDataParallel synchronises gradients only through ``forward``."""
        return self.training_step(batch)

    def after_optimizer_step(self) -> None:
        """Called once after every optimizer step; default does nothing."""
