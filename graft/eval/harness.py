"""One evaluation entry point for training-time and `graft eval`: every metric of every split.

Returns a flat dict. The `test` split's metrics are unprefixed (`vqa_acc`, `vqa_acc/color`,
`caption_cider`); other splits are prefixed with their name (`compositional/vqa_acc`).
"""

from __future__ import annotations

import torch

from graft.config import Config
from graft.data.stream import make_world
from graft.eval.captioning import caption_cider
from graft.eval.vqa import vqa_accuracy


@torch.no_grad()
def evaluate(model, proc, cfg: Config, splits: list[str] | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    world, e = make_world(cfg), cfg.eval
    results: dict[str, float] = {}
    for split in splits or e.splits:
        prefix = "" if split == "test" else f"{split}/"
        metrics = vqa_accuracy(model, proc, world, split, e.vqa_per_type, e.batch_size)
        if e.captions > 0:
            metrics |= caption_cider(model, proc, world, split, e.captions, e.batch_size, e.max_new_tokens)
        results |= {prefix + k: round(v, 4) for k, v in metrics.items()}
    model.train(was_training)
    return results
