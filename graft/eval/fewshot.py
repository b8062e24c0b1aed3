"""In-context evaluation on the built-in world: few-shot VQA and captioning, and questions across a document's images.

`fewshot` (`--data SPLIT`): for each k in `eval.shots`, every query of the split gets k solved
examples before it, each an image with its question and answer (VQA: a question of the query's type;
captioning: the caption request and caption). The examples are train-split samples drawn
deterministically per query (the same for every k and every run: example j of query i is a pure
function of (seed, split, i, j)), so the k-shot prompts grow by adding examples, never swapping them.
The queries are those of the `shapes` task (`eval.vqa_per_type` per question type, `eval.captions`
images), so 0-shot equals its zero-shot score. Metrics: `fewshot_vqa@k`, `fewshot_cider@k`.

`documents` (`--data SPLIT`): `eval.documents` interleaved documents of `eval.doc_images` images
(data/documents.py), one question per image whatever the training config; the model reads a
document's image turns (questions and their true answers) and answers each question about the
images together. Metrics: `doc_acc` and per kind
(`doc_acc/which`: which image shows an object, `doc_acc/recall`: a question about an earlier image).
"""

from __future__ import annotations

import random
from collections import defaultdict

from graft.data.documents import CROSS_KINDS, document
from graft.data.shapes import CAPTION_PROMPT, ShapesWorld
from graft.eval.captioning import cider, tokenize
from graft.eval.vqa import answer, normalise, questions
from graft.eval.world import WorldSplit


def shots(world: ShapesWorld, split: str, index: int, k: int, kind: str | None) -> list[tuple[object, str, str]]:
    """k (image, question, answer) train-split examples for query `index`; `kind`: a question type
    (VQA) or None (captioning)."""
    rng, out = random.Random(f"shots/{world.seed}/{split}/{index}/{kind}"), []
    while len(out) < k:
        sample = world.sample("train", rng.randrange(1 << 30))
        qa = sample.question(kind) if kind else None
        if kind is None:
            out.append((sample.image, CAPTION_PROMPT, sample.caption))
        elif qa is not None:
            out.append((sample.image, qa.question, qa.answer))
    return out


def prompt(examples: list[tuple[object, str, str]], image, question: str) -> tuple:
    """An `answer` prompt: the examples' turns (one image each, at its start), then the query."""
    context = ([(q, a) for _, q, a in examples], [(i, 0) for i in range(len(examples))])
    return [img for img, _, _ in examples] + [image], question, context


def fewshot_vlm(model, proc, data: WorldSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e, world, split = cfg.eval, data.world, data.name
    metrics, predictions = {}, []
    items = questions(world, split, e.vqa_per_type)
    captioned = range(e.captions)
    for k in e.shots:
        vqa = [prompt(shots(world, split, i, k, qa.kind), world.sample(split, i).image, qa.question) for i, qa in items]
        preds = answer(model, proc, vqa, e.batch_size, max_new_tokens=4)
        right = [normalise(p) == normalise(qa.answer) for p, (_, qa) in zip(preds, items)]
        metrics[f"fewshot_vqa@{k}"] = sum(right) / max(1, len(items))
        predictions += [{"id": f"{split}/{i}@{k}", "question": qa.question, "prediction": p, "reference": qa.answer,
                         "correct": r} for (i, qa), p, r in zip(items, preds, right)]
        if not e.captions:
            continue
        samples = [world.sample(split, i) for i in captioned]
        caps = [prompt(shots(world, split, i, k, None), s.image, CAPTION_PROMPT) for i, s in zip(captioned, samples)]
        preds = answer(model, proc, caps, e.batch_size, e.max_new_tokens)
        metrics[f"fewshot_cider@{k}"] = cider(preds, [[s.caption] for s in samples])
        predictions += [{"id": f"{split}/caption/{i}@{k}", "question": CAPTION_PROMPT, "prediction": p,
                         "reference": s.caption, "correct": tokenize(p) == tokenize(s.caption)}
                        for i, p, s in zip(captioned, preds, samples)]
    return metrics, predictions


def documents_vlm(model, proc, data: WorldSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e, world, split = cfg.eval, data.world, data.name
    asked = []  # (document, turn)
    for i in range(e.documents):
        doc = document(world, split, i, e.doc_images, 1, 0.0)  # one question per image: the rest can be recalled
        asked += [(i, doc, t) for t, kind in enumerate(doc.kinds) if kind in CROSS_KINDS]
    prompts = [([s.image for s in doc.samples], doc.turns[t][0], (doc.turns[:t], doc.places)) for _, doc, t in asked]
    preds = answer(model, proc, prompts, e.batch_size, max_new_tokens=4)
    right, predictions = defaultdict(list), []
    for (i, doc, t), pred in zip(asked, preds):
        (question, reference), kind = doc.turns[t], doc.kinds[t]
        right[kind].append(normalise(pred) == normalise(reference))
        predictions.append({"id": f"{split}/doc{i}/{t}", "question": question, "prediction": pred,
                            "reference": reference, "correct": right[kind][-1]})
    metrics = {"doc_acc": sum(map(sum, right.values())) / max(1, len(asked))}
    return metrics | {f"doc_acc/{kind}": sum(v) / len(v) for kind, v in right.items()}, predictions
