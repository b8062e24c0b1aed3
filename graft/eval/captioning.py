"""Caption quality as CIDEr-D (Vedantam et al. 2015), computed by `pycocoevalcap`'s scorer.

Captions are lower-cased and split on whitespace with punctuation removed before scoring (the
COCO PTB tokenizer needs Java; the world's captions are plain lower-case words).
"""

from __future__ import annotations

import re

from pycocoevalcap.cider.cider import Cider

from graft.data.shapes import CAPTION_PROMPT, ShapesWorld
from graft.eval.vqa import answer


def tokenize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D of candidates[i] against references[i] (the idf comes from the references)."""
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_cider(model, proc, world: ShapesWorld, split: str, n: int, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    samples = [world.sample(split, i) for i in range(n)]
    preds = answer(model, proc, [(s.image, CAPTION_PROMPT) for s in samples], batch_size, max_new_tokens)
    exact = sum(tokenize(p) == tokenize(s.caption) for p, s in zip(preds, samples)) / n
    return {"caption_cider": cider(preds, [[s.caption] for s in samples]), "caption_exact": exact}
