"""VQA exact-match accuracy, overall and per question type, with greedy answers.

The question set of a split is fixed: for type t, the first `per_type` samples among indices
t, t+6, t+12, ... that can pose a question of type t (a type the world cannot pose, e.g. spatial
relations with one object per image, is left out rather than searched for forever). Answers are compared after lower-casing
and stripping spaces and a final full stop.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from graft.data.shapes import QA, QUESTION_TYPES, ShapesWorld


def questions(world: ShapesWorld, split: str, per_type: int) -> list[tuple[int, QA]]:
    items = []
    for offset, kind in enumerate(QUESTION_TYPES):
        found, index = 0, offset
        while found < per_type and index < offset + 50 * per_type * len(QUESTION_TYPES):
            qa = world.sample(split, index).question(kind)
            if qa is not None:
                items.append((index, qa))
                found += 1
            index += len(QUESTION_TYPES)
    return items


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


@torch.no_grad()
def answer(model, proc, prompts: list[tuple[object, str]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers for (PIL image, question) pairs. Prompts of equal length are batched together."""
    encoded = [(proc.prompt(q), proc.pixels(img)) for img, q in prompts]
    by_len = defaultdict(list)
    for i, (ids, _) in enumerate(encoded):
        by_len[len(ids)].append(i)
    out = [""] * len(prompts)
    device = next(model.parameters()).device
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            ids = torch.tensor([encoded[i][0] for i in chunk], device=device)
            pix = torch.stack([encoded[i][1] for i in chunk]).to(device)
            for i, new in zip(chunk, model.generate(ids, pix, max_new_tokens, proc.tok.eos)):
                out[i] = proc.tok.decode(new)
    return out


def vqa_accuracy(model, proc, world: ShapesWorld, split: str, per_type: int, batch_size: int) -> dict[str, float]:
    items = questions(world, split, per_type)
    prompts = [(world.sample(split, i).image, qa.question) for i, qa in items]
    preds = answer(model, proc, prompts, batch_size, max_new_tokens=4)
    right = defaultdict(list)
    for (_, qa), pred in zip(items, preds):
        right[qa.kind].append(normalise(pred) == normalise(qa.answer))
    result = {"vqa_acc": sum(sum(v) for v in right.values()) / max(1, len(items))}
    for kind in QUESTION_TYPES:
        if right[kind]:
            result[f"vqa_acc/{kind}"] = sum(right[kind]) / len(right[kind])
    return result
