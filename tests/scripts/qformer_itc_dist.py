"""Run under `torchrun --standalone --nproc_per_node=2`: BLIP-2's ITC (graft/models/blip2.py) on
half a batch per rank equals one process with the whole batch — the loss, the gradients of each
rank's own query and text features, and (summed over ranks) the temperature's gradient."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from graft.models.blip2 import itc_loss

ATOL = 1e-5


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    x = F.normalize(torch.randn(8, 3, 5, generator=g), dim=-1)  # 8 pairs, 3 queries, E = 5
    y = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
    scale = torch.tensor(9.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, y, scale)]
    full = itc_loss(*leaves)
    full.backward()
    b = 8 // world
    mine = [t.clone().requires_grad_(True) for t in (x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], scale)]
    loss = itc_loss(*mine, rank=rank, world_size=world)
    loss.backward()
    assert torch.allclose(loss, full, atol=ATOL), (loss.item(), full.item())
    for got, want in zip(mine[:2], leaves[:2]):
        assert torch.allclose(got.grad, want.grad[rank * b:(rank + 1) * b], atol=ATOL)
    summed = mine[2].grad.clone()
    dist.all_reduce(summed)
    assert torch.allclose(summed, leaves[2].grad, atol=ATOL), (summed, leaves[2].grad)
    print(f"rank {rank}: itc OK (loss {loss.item():.6f})", flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown (see contrastive_losses_dist.py)


if __name__ == "__main__":
    main()
