"""A third-party seg plugin: one backbone and one loss, registered through the ``seg`` entry-point group."""

import torch

import seg


class TinyNet(torch.nn.Module):
    """Two 3x3x3 convolutions: the smallest network that fits seg's backbone contract."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 4):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(in_channels, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv3d(width, out_channels, 3, padding=1),
        )

    def forward(self, x):
        return self.body(x)


def soft_l1_loss(num_classes: int):
    """Mean absolute difference between softmax probabilities and one-hot labels."""

    def loss(logits, labels):
        onehot = torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()
        return (logits.softmax(1) - onehot).abs().mean()

    return loss


@seg.hookimpl
def register_backbones(register):
    register("example_tiny", TinyNet)


@seg.hookimpl
def register_losses(register):
    register("example_l1", soft_l1_loss)
