"""Fine-tuning under DistributedDataParallel: gloo on CPU with 2 processes; both ranks end identical and
rank 0 alone writes."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from seg.core.config import load_experiment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str, stage: str):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from seg.core import distributed
    from seg.core.console import set_quiet

    set_quiet(True)
    exp = load_experiment("smoke", ["finetune.epochs=2", "pretrain.epochs=2"])
    if stage == "finetune":
        from seg.core.finetune import finetune

        module = finetune(data, out, exp, device="cpu")
    else:
        from seg.core.pretrain import pretrain

        module = pretrain(data, out, exp, device="cpu")
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, f"{result_dir}/rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_two_ranks_end_with_identical_state(stage, synth_data, tmp_path):
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(synth_data), str(out), str(tmp_path), stage), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    # batch-norm running statistics are per rank (each saw its own patches); everything trained must agree
    for key in [k for k in rank0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]:
        assert torch.equal(rank0[key], rank1[key]), key  # weights, momentum encoders and queues alike
    assert (out / "checkpoint_latest.pt").exists()
    assert not list(out.glob("*.tmp*"))
