"""`eval.heldout_batches=K`: the training objective on records the run never saw.

At the end of training, K steps' worth of micro-batches of the `val` split of the run's built-in
world go through exactly what a training step computes — the same processor, conversation format
and packing, the design's losses and objectives, each summed and divided by what it counts, then
weighted by `train.objectives` — without a gradient. The world's splits are disjoint by
construction (data/shapes.py: sample i of split s is a pure function of (seed, s, i)), so this is
the loss a scaling law fits: the training distribution, unseen. Results: `heldout_loss`, and
`heldout_loss/<name>` for each named loss when there are several. Every process reads its own
share of the K steps and the sums are added over processes, like a training step's.

Only an indexed source with a `val` split has records that are provably unseen; any other source
is refused when the config is checked (config_checks.py).
"""

from __future__ import annotations

import torch

from graft.data.sources import build_sources
from graft.data.stream import IndexedStream
from graft.designs import uses_packing
from graft.distill import loss_weights
from graft.trainer import runtime

SPLIT = "val"


@torch.no_grad()
def heldout_losses(cfg, proc, losses, engine, rt) -> dict[str, float]:
    """The weighted objective and each named loss on `cfg.eval.heldout_batches` steps of the val split."""
    (source,) = build_sources(cfg, proc, SPLIT)[0]
    stream = IndexedStream(source, proc, cfg, rt.rank, rt.world_size, packs=uses_packing(cfg))
    sums: dict[str, float] = {}
    counted: dict[str, int] = {}
    model = losses.model
    was_training = model.training
    model.eval()
    for step in range(cfg.eval.heldout_batches):
        for micro in range(cfg.train.grad_accum):
            batch = {k: v.to(rt.device) for k, v in stream.batch(step, micro).items()}
            for name, n in losses.counts(batch).items():
                counted[name] = counted.get(name, 0) + n
            with rt.autocast():
                for name, value in losses.losses(engine, batch).items():
                    sums[name] = sums.get(name, 0.0) + value.item()
    model.train(was_training)
    sums, counted = runtime.all_sum(sums, rt), runtime.all_sum(counted, rt)
    named = {name: sums[name] / max(counted[name], 1) for name in sums}
    weights = loss_weights(cfg, named)
    total = sum(weights[name] * value for name, value in named.items())
    return {"heldout_loss": total, **({f"heldout_loss/{k}": v for k, v in named.items()} if len(named) > 1 else {})}
