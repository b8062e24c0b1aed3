"""Caption quality as CIDEr-D (Vedantam et al. 2015), BLEU-4 and ROUGE-L, computed by `pycocoevalcap`'s
scorers (its METEOR and SPICE need Java, so they are left out).

Captions are lower-cased and split on whitespace with punctuation removed before scoring (the
COCO PTB tokenizer needs Java; the world's captions are plain lower-case words).
"""

from __future__ import annotations

import re
import sys

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from tqdm import tqdm

from graft.data.images import open_within
from graft.data.samples import BadSample
from graft.data.shapes import CAPTION_PROMPT, ShapesWorld
from graft.errors import UserError
from graft.eval.vqa import answer


def tokenize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D of candidates[i] against references[i] (the idf comes from the references)."""
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_cider(model, proc, world: ShapesWorld, split: str, n: int, batch_size: int, max_new_tokens: int,
                  prompt: str = CAPTION_PROMPT, pose=lambda sample, question: (sample.image, question)
                  ) -> tuple[dict[str, float], list[dict]]:
    """CIDEr-D and exact match of the captions of the first n samples of `split`; `prompt`, `pose`:
    another world's caption request and how its sample and a question make a prompt for `answer`."""
    samples = [world.sample(split, i) for i in range(n)]
    preds = answer(model, proc, [pose(s, prompt) for s in samples], batch_size, max_new_tokens)
    return _scored(preds, samples, split, prompt)


def captioner_cider(model, proc, world: ShapesWorld, split: str, n: int, batch_size: int) -> tuple[dict[str, float], list[dict]]:
    """`caption_cider` for a model that captions with no prompt (CoCa's greedy `caption`)."""
    samples = [world.sample(split, i) for i in range(n)]
    return _scored(captions_of(model, proc, [s.image for s in samples], batch_size), samples, split, None)


@torch.no_grad()
def captions_of(model, proc, images: list, batch_size: int) -> list[str]:
    """The greedy captions of a model that captions with no prompt (CoCa), batch by batch."""
    device, out = next(model.parameters()).device, []
    for s in range(0, len(images), batch_size):
        pixels = torch.stack([proc.pixels(img) for img in images[s : s + batch_size]]).to(device)
        out += [proc.tok.decode(ids) for ids in model.caption(pixels)]
    return out


def _scored(preds: list[str], samples: list, split: str, prompt: str | None) -> tuple[dict[str, float], list[dict]]:
    predictions = [{"id": f"{split}/{i}", "question": prompt, "prediction": p, "reference": s.caption,
                    "correct": tokenize(p) == tokenize(s.caption)} for i, (p, s) in enumerate(zip(preds, samples))]
    exact = sum(p["correct"] for p in predictions) / len(samples)
    return {"caption_cider": cider(preds, [[s.caption] for s in samples]), "caption_exact": exact}, predictions


def bleu4(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (pycocoevalcap, as the COCO caption evaluation reports it)."""
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def rouge_l(candidates: list[str], references: list[list[str]]) -> float:
    """Mean ROUGE-L F-score (pycocoevalcap: longest common subsequence, beta 1.2, best reference)."""
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    score, _ = Rouge().compute_score(gts, res)
    return float(score)


@torch.no_grad()
def captioner_on(model, proc, data, cfg) -> tuple[dict[str, float], list[dict]]:
    """`caption_on` for a model that captions with no prompt (CoCa)."""
    return caption_on(model, proc, data, cfg, write=lambda images: captions_of(model, proc, images, cfg.eval.batch_size))


def caption_on(model, proc, data, cfg, chunk: int = 256, write=None) -> tuple[dict[str, float], list[dict]]:
    """CIDEr-D and BLEU-4 of greedy captions (prompt: the run's data.caption_prompt; `write`: images →
    captions otherwise) for a CaptionedSet (eval/captioned.py); images decoded with the data
    limits, bad ones counted."""
    d, e = cfg.data, cfg.eval
    keys, preds, refs, pending = [], [], [], []
    write = write or (lambda images: answer(model, proc, [(img, d.caption_prompt) for img in images], e.batch_size,
                                            e.max_new_tokens))

    def flush():
        preds.extend(write([img for _, img, _ in pending]))
        keys.extend(k for k, _, _ in pending), refs.extend(r for _, _, r in pending)
        pending.clear()

    for key, raw, captions in tqdm(data.items(), desc="caption", unit="image", disable=not sys.stderr.isatty()):
        try:
            pending.append((key, open_within(raw, d)[0], captions))
        except BadSample as err:
            data.log.skip(err.reason, key, err.detail)
        if len(pending) == chunk:
            flush()
    flush() if pending else None
    if not preds:
        raise UserError(f"--data {data.name}: no usable image (skipped: {dict(data.log.skipped)})")
    predictions = [{"id": k, "prediction": p, "reference": r, "correct": tokenize(p) in {tokenize(x) for x in r}}
                   for k, p, r in zip(keys, preds, refs)]
    return {"caption_cider": cider(preds, refs), "caption_bleu4": bleu4(preds, refs), "caption_rouge_l": rouge_l(preds, refs),
            "caption_exact": sum(p["correct"] for p in predictions) / len(predictions)}, predictions
