"""Multi-process training through torchrun: rank/world from the environment, rank 0 alone writes.

``torchrun --nproc_per_node N -m seg run ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; ``seg run ... --nproc N``
re-launches itself through torchrun. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes checkpoints, logs and progress bars."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Initialise the process group if launched by torchrun; returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (a one-item list when not distributed)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
