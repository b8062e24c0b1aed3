"""One evaluation entry point for training-time and `graft eval`: every metric of every split.

Returns a flat dict. The `test` split's metrics are unprefixed (`vqa_acc`, `vqa_acc/color`,
`caption_cider`; for dual encoders `zeroshot_acc`, `i2t_r@1`, `t2i_r@1`, ...); other splits
are prefixed with their name (`compositional/vqa_acc`).
"""

from __future__ import annotations

import torch

from graft.config import Config
from graft.data.stream import make_world
from graft.eval.captioning import caption_cider
from graft.eval.retrieval import retrieval
from graft.eval.vqa import vqa_accuracy
from graft.eval.zero_shot import zero_shot


@torch.no_grad()
def evaluate(model, proc, cfg: Config, splits: list[str] | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    world, e = make_world(cfg), cfg.eval
    results: dict[str, float] = {}
    for split in splits or e.splits:
        prefix = "" if split == "test" else f"{split}/"
        if cfg.model == "dual":
            metrics = _contrastive(model, proc, world, split, e)
        else:
            metrics = vqa_accuracy(model, proc, world, split, e.vqa_per_type, e.batch_size)
            if e.captions > 0:
                metrics |= caption_cider(model, proc, world, split, e.captions, e.batch_size, e.max_new_tokens)
        results |= {prefix + k: round(v, 4) for k, v in metrics.items()}
    model.train(was_training)
    return results


def _contrastive(model, proc, world, split: str, e) -> dict[str, float]:
    """Dual encoders: zero-shot top-1/top-5 and image↔text Recall@1/5/10."""
    metrics = {}
    if e.zeroshot_images > 0:
        metrics |= zero_shot(model, proc, world, split, e.zeroshot_images, e.zeroshot_file, e.batch_size)
    if e.retrieval_pairs > 0:
        metrics |= retrieval(model, proc, world, split, e.retrieval_pairs, e.batch_size)
    return metrics
