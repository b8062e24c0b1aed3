"""One evaluation entry point for training-time and `graft eval`: every metric of every split,
and every task on a user's data named in `eval.tasks`.

Returns a flat dict. The `test` split's metrics are unprefixed (`vqa_acc`, `vqa_acc/color`,
`caption_cider`; for dual encoders `zeroshot_acc`, `i2t_r@1`, `t2i_r@1`, ...); other splits
are prefixed with their name (`compositional/vqa_acc`). `eval.tasks` entries are `TASK=PATH`
(eval/tasks.py); with one entry its metrics are unprefixed, with several each is prefixed with its
data's name (`pets/zeroshot_acc`). Their per-example predictions go to `OUT/eval_<task>.jsonl`
(`OUT/eval_<name>_<task>.jsonl` with several).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from graft import atomic
from graft.config import Config
from graft.data.stream import make_world
from graft.eval.captioning import caption_cider
from graft.eval.retrieval import retrieval
from graft.eval.vqa import vqa_accuracy
from graft.eval.zero_shot import zero_shot


@torch.no_grad()
def evaluate(model, proc, cfg: Config, splits: list[str] | None = None, out: Path | None = None) -> dict[str, float]:
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
    for entry in e.tasks:
        results |= _task(model, proc, cfg, entry, len(e.tasks) > 1, out)
    model.train(was_training)
    return results


def _task(model, proc, cfg: Config, entry: str, several: bool, out: Path | None) -> dict[str, float]:
    from graft.eval.tasks import run_task

    name, path = entry.split("=", 1)
    data_name = Path(path.rstrip("/")).name
    metrics, predictions = run_task(name, model, proc, cfg, path)
    if out is not None:
        file = out / (f"eval_{data_name}_{name}.jsonl" if several else f"eval_{name}.jsonl")
        atomic.write_text(file, "".join(json.dumps(p) + "\n" for p in predictions))
    prefix = f"{data_name}/" if several else ""
    return {prefix + k: round(v, 4) for k, v in metrics.items()}


def _contrastive(model, proc, world, split: str, e) -> dict[str, float]:
    """Dual encoders: zero-shot top-1/top-5 and image↔text Recall@1/5/10."""
    metrics = {}
    if e.zeroshot_images > 0:
        metrics |= zero_shot(model, proc, world, split, e.zeroshot_images, e.zeroshot_file, e.batch_size)
    if e.retrieval_pairs > 0:
        metrics |= retrieval(model, proc, world, split, e.retrieval_pairs, e.batch_size)
    return metrics
