"""Evaluation spread over the processes of a run: each computes its share, all get the whole.

The trainer evaluates inside `sharded(rt)`; the model calls of the tasks (greedy answers, answer
likelihoods, image and text embeddings) go through `shard_map`, which gives process r the r-th
contiguous slice of the inputs and gathers every slice's outputs, in order, on every process. The
metrics are then computed from all outputs on every process alike, so they equal one process's
evaluation and no process waits idle. Outside `sharded` (one process, `graft eval`) it is a plain call.
The model must hold its whole weights on every process meanwhile (trainer/parallel.py `gathered`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch.distributed as dist

_world: tuple[int, int] | None = None  # (rank, world size) while sharded


@contextlib.contextmanager
def sharded(rank: int, world_size: int):
    global _world
    previous, _world = _world, ((rank, world_size) if world_size > 1 else None)
    try:
        yield
    finally:
        _world = previous


def shard_map(fn: Callable[[Sequence], list], items: Sequence) -> list:
    """fn(items), computed as fn(slice) on each process and gathered (fn maps a sequence to a list
    of the same length)."""
    if _world is None:
        return list(fn(items)) if len(items) else []
    rank, world = _world
    per = -(-len(items) // world)
    mine = items[rank * per:(rank + 1) * per]
    out = list(fn(mine)) if len(mine) else []
    gathered: list = [None] * world
    dist.all_gather_object(gathered, out)  # between this run's own processes; never read from a file
    return [x for part in gathered for x in part]
