"""``pcrl`` and ``contrastive`` under DistributedDataParallel: gloo on CPU, 2 processes.

Both ranks must end with identical weights (ordinary and momentum encoders, heads) and identical queues,
and the key encoder's shuffle-BN must equal plain batch norm over each shuffle group of the global batch.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
STEPS = 3


def _worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from seg.plugins.contrastive import Contrastive
        from seg.plugins.moco import ShuffledBatchNorm
        from seg.plugins.pcrl import PCRL
        from tests.test_pcrl import TinyUNet, smooth_volumes

        results = {}
        norm = ShuffledBatchNorm(3)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
        x = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(rank))
        norm.groups = torch.tensor([1, 0, 0, 1])
        results["bn"] = {"x": x, "y": norm(x).detach(), "running_mean": norm.running_mean.clone(),
                         "running_var": norm.running_var.clone()}

        for name, cls in (("pcrl", PCRL), ("contrastive", Contrastive)):
            torch.manual_seed(rank)  # different initialisation on each rank: DDP must broadcast rank 0's
            task = cls(TinyUNet(), queue_size=32, crop_size=(16, 16, 16))
            model = torch.nn.parallel.DistributedDataParallel(task, find_unused_parameters=True)
            optimizer = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-3)
            for step in range(STEPS):
                loss, _ = model(smooth_volumes(2, seed=100 * rank + step))  # each rank its own data
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                task.after_optimizer_step()
            results[name] = {k: v.detach().clone() for k, v in task.state_dict().items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_stay_identical(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # shuffle-BN: global samples 0..3 (rank 0 holds 0, 1), groups [1, 0, 0, 1]
    xs = torch.cat([ranks[r]["bn"]["x"] for r in range(WORLD)])
    weight, bias = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 3.0])
    expect = torch.empty_like(xs)
    for members in ([1, 2], [0, 3]):
        expect[members] = F.batch_norm(xs[members], None, None, weight, bias, training=True, eps=1e-5)
    got = torch.cat([ranks[r]["bn"]["y"] for r in range(WORLD)])
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    flat = xs.transpose(0, 1).reshape(3, -1)
    for r in range(WORLD):  # running statistics of the whole global batch, the same on every rank
        torch.testing.assert_close(ranks[r]["bn"]["running_mean"], 0.1 * flat.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[r]["bn"]["running_var"], 0.9 + 0.1 * flat.var(1), rtol=1e-5, atol=1e-6)

    for name, key_sets in (("pcrl", 3), ("contrastive", 1)):
        first, second = ranks[0][name], ranks[1][name]
        assert first.keys() == second.keys()
        local_stats = [k for k in first if k.startswith("backbone.") and "running_" in k]
        assert local_stats and any(not torch.equal(first[k], second[k]) for k in local_stats), \
            "the ranks should have seen different data"
        for key in first:
            if key not in local_stats:  # the ordinary encoder's BN statistics are per rank, as in any DDP run
                assert torch.equal(first[key], second[key]), (name, key)
        assert int(first["queue.pointer"]) == STEPS * key_sets * 2 * WORLD % 32
        assert any(k.startswith("momentum_backbone.") and "running_mean" in k for k in first)
