"""`text` (`--data SPLIT`): the language side alone — the world's questions with the scene told in
words and no image (data.text_only's conversations, data/stream.py `in_words`).

Metrics: `text_loss`, the mean cross-entropy per answer token with the true answer fed in (the
held-out text loss of the minimal-adaptation measurement: how much training on images disturbs what
the language model does with text), and `text_acc`, greedy exact match. The questions are the
`shapes` task's (`eval.vqa_per_type` per question type), each asked about its scene in words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.data.processor import collate
from graft.data.world_source import in_words
from graft.eval.shard import shard_map
from graft.eval.vqa import answer, normalise, questions
from graft.eval.world import WorldSplit
from graft.losses import IGNORE


def text_vlm(model, proc, data: WorldSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e, world, split = cfg.eval, data.world, data.name
    items = questions(world, split, e.vqa_per_type)
    turns = [in_words(world.sample(split, i), [(qa.question, qa.answer)])[0] for i, qa in items]
    preds = answer(model, proc, [([], question) for question, _ in turns], e.batch_size, max_new_tokens=4)
    sums = shard_map(lambda share: _loss_sums(model, proc, share, e.batch_size), turns)
    right = [normalise(p) == normalise(a) for p, (_, a) in zip(preds, turns)]
    predictions = [{"id": f"{split}/{i}", "question": q, "prediction": p, "reference": a, "correct": r}
                   for (i, _), (q, a), p, r in zip(items, turns, preds, right)]
    loss = sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))
    return {"text_loss": loss, "text_acc": sum(right) / max(1, len(items))}, predictions


@torch.no_grad()
def _loss_sums(model, proc, turns: list[tuple[str, str]], batch_size: int) -> list[tuple[float, int]]:
    """(Σ cross-entropy over the answer's tokens, their count) per (question, answer)."""
    device, out = next(model.parameters()).device, []
    for s in range(0, len(turns), batch_size):
        batch = collate([(*proc.conversation([turn], []), []) for turn in turns[s: s + batch_size]],
                        proc.tok.pad, proc.image_size)
        logits, _ = model(batch["input_ids"].to(device), batch["pixel_values"].to(device))
        target = batch["labels"][:, 1:].to(device)
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        out += list(zip(ce.sum(1).tolist(), (target != IGNORE).sum(1).tolist()))
    return out
