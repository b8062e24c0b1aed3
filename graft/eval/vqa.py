"""VQA exact-match accuracy, overall and per question type, with greedy answers.

The question set of a split is fixed: for type t, the first `per_type` samples among indices
t, t+6, t+12, ... that can pose a question of type t (a type the world cannot pose, e.g. spatial
relations with one object per image, is left out rather than searched for forever). Answers are compared after lower-casing
and stripping spaces and a final full stop.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from graft.data.images import open_within
from graft.data.samples import BadSample
from graft.data.shapes import QA, QUESTION_TYPES, ShapesWorld
from graft.errors import UserError
from graft.eval.shard import shard_map
from graft.eval.vqav2 import soft_accuracy


def questions(world: ShapesWorld, split: str, per_type: int, types: tuple[str, ...] = QUESTION_TYPES) -> list[tuple[int, QA]]:
    """(sample index, question) pairs: per type, the first `per_type` samples that pose it (see above)."""
    items = []
    for offset, kind in enumerate(types):
        found, index = 0, offset
        while found < per_type and index < offset + 50 * per_type * len(types):
            qa = world.sample(split, index).question(kind)
            if qa is not None:
                items.append((index, qa))
                found += 1
            index += len(types)
    return items


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def answer(model, proc, prompts: list[tuple], batch_size: int, max_new_tokens: int,
           sampling: tuple[float, float, int] | None = None) -> list[str]:
    """Greedy answers (each process answers its share, eval/shard.py) to prompts (image, question) or
    (images, question, context[, at]): `context` = earlier (turns, places) holding the first images
    (few-shot examples, a document; Processor.prompt), the question the rest, at the character
    offsets `at` (default: at its start). `sampling`:
    (temperature, top_p, seed) to sample instead (VLM.generate), the same answers for the same seed."""
    return shard_map(lambda share: _answer(model, proc, share, batch_size, max_new_tokens, sampling), prompts)


def _encoded(proc, prompt: tuple) -> tuple[list[int], list[torch.Tensor]]:
    images, question, *rest = prompt
    images = images if isinstance(images, list) else [images]
    context = rest[0] if rest else ((), ())
    at = rest[1] if len(rest) > 1 else None
    items = [proc.pixels(img) for img in images]
    ids, _ = proc.fit(proc.prompt(question, len(images) - len(context[1]), context, at), None, items)
    return ids, items


@torch.no_grad()
def _answer(model, proc, prompts, batch_size: int, max_new_tokens: int, sampling=None) -> list[str]:
    """Prompts of equal length are batched together."""
    encoded = [_encoded(proc, p) for p in prompts]
    by_len = defaultdict(list)
    for i, (ids, _) in enumerate(encoded):
        by_len[len(ids)].append(i)
    out = [""] * len(prompts)
    device = next(model.parameters()).device
    temperature, top_p, seed = sampling or (0.0, 1.0, 0)
    generator = torch.Generator(device=device).manual_seed(seed)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            ids = torch.tensor([encoded[i][0] for i in chunk], device=device)
            items = {k: v.to(device) for k, v in proc.inputs([x for i in chunk for x in encoded[i][1]]).items()}
            new_ids = model.generate(ids, max_new_tokens=max_new_tokens, eos_id=proc.tok.eos, temperature=temperature,
                                     top_p=top_p, generator=generator, **items)
            for i, new in zip(chunk, new_ids):
                out[i] = proc.tok.decode(new)
    return out


def vqa_accuracy(model, proc, world: ShapesWorld, split: str, per_type: int, batch_size: int,
                 types: tuple[str, ...] = QUESTION_TYPES, pose=lambda sample, question: (sample.image, question)
                 ) -> tuple[dict[str, float], list[dict]]:
    """Accuracy overall and per question type, and one prediction per question. `types`, `pose`:
    another world's question types and how its sample and a question make a prompt for `answer`
    (the sensor world's recording; a clip's frames)."""
    items = questions(world, split, per_type, types)
    prompts = [pose(world.sample(split, i), qa.question) for i, qa in items]
    preds = answer(model, proc, prompts, batch_size, max_new_tokens=4)
    right, predictions = defaultdict(list), []
    for (index, qa), pred in zip(items, preds):
        right[qa.kind].append(normalise(pred) == normalise(qa.answer))
        predictions.append({"id": f"{split}/{index}", "question": qa.question, "prediction": pred,
                            "reference": qa.answer, "correct": right[qa.kind][-1]})
    result = {"vqa_acc": sum(sum(v) for v in right.values()) / max(1, len(items))}
    for kind in types:
        if right[kind]:
            result[f"vqa_acc/{kind}"] = sum(right[kind]) / len(right[kind])
    return result, predictions


def option_letter(text: str, options: dict[str, str]) -> str | None:
    """The option a free-form answer picks: its first standalone option letter ("B", "(B)", "B. cat",
    "the answer is B"), else the option whose text it equals."""
    for word in re.findall(r"\b[A-J]\b", text):
        if word in options:
            return word
    return next((k for k, v in options.items() if normalise(v) == normalise(text)), None)


@torch.no_grad()
def vqa_on(model, proc, data, cfg, chunk: int = 256) -> tuple[dict[str, float], list[dict]]:
    """Accuracy on a QuestionSet (eval/questions.py): exact match for open questions, the picked
    option for multiple choice, VQAv2's soft accuracy (eval/vqav2.py) where a question has human
    answers, then also per answer type; prompts from eval.vqa_prompt / eval.mc_prompt."""
    d, e = cfg.data, cfg.eval
    done, pending = [], []

    def prompt(q) -> str:
        if q.options is None:
            return e.vqa_prompt.format(question=q.question)
        return e.mc_prompt.format(question=q.question, options="\n".join(f"{k}. {v}" for k, v in q.options.items()))

    def flush():
        preds = answer(model, proc, [(img, prompt(q)) for q, img in pending], e.batch_size, e.max_new_tokens)
        done.extend((q, p) for (q, _), p in zip(pending, preds))
        pending.clear()

    for q in tqdm(data.items(), desc="vqa", unit="question", disable=not sys.stderr.isatty()):
        try:
            pending.append((q, open_within(q.image, d)[0]))
        except BadSample as err:
            data.log.skip(err.reason, q.id, err.detail)
        if len(pending) == chunk:
            flush()
    flush() if pending else None
    if not done:
        raise UserError(f"--data {data.name}: no usable question (skipped: {dict(data.log.skipped)})")
    predictions, scores = [], defaultdict(list)
    for q, pred in done:
        predictions.append(_judged(q, pred))
        score = predictions[-1].get("score", predictions[-1]["correct"])
        scores["vqa_acc"].append(score)
        if q.kind is not None:  # VQAv2's answer_type
            scores[f"vqa_acc/{q.kind}"].append(score)
    return {k: sum(v) / len(v) for k, v in scores.items()}, predictions


def _judged(q, pred: str) -> dict:
    """One prediction record. With human answers (VQAv2) `score` is the soft accuracy that vqa_acc
    averages, and `correct` says that at least one human gave this answer (score > 0)."""
    if q.answers is not None:
        score = soft_accuracy(pred, q.answers)
        return {"id": q.id, "prediction": pred, "reference": q.answers, "correct": score > 0, "score": score}
    ok = option_letter(pred, q.options) == q.answer if q.options else normalise(pred) == normalise(q.answer)
    return {"id": q.id, "prediction": pred, "reference": q.answer, "correct": ok}
