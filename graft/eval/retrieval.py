"""Image→text and text→image retrieval with a dual encoder: Recall@K over n image–caption pairs;
with `eval.itm_rerank` = K (a model with image–text matching: `contrastive.itm_layers`, the Q-Former
stage 1), also after re-ranking each query's contrastive top K by the match probability (BLIP).

Pair i is image i of the split and its caption. Several Shapes images can share a caption word
for word (e.g. two single-object scenes "a small red circle" in different cells): such texts are
indistinguishable, so a retrieved item counts as correct when its caption equals the query's pair
caption, not only when it is the very same index.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from graft.data.contrastive import pair_text
from graft.data.images import open_within
from graft.data.samples import BadSample
from graft.data.shapes import ShapesWorld
from graft.errors import UserError
from graft.eval.zero_shot import embed_images, embed_texts

KS = (1, 5, 10)


def recall_at_k(sims: torch.Tensor, same: torch.Tensor) -> dict[int, float]:
    """sims (Q, N) query-by-candidate scores; same (Q, N) True where candidate j is a right answer."""
    top = sims.topk(min(max(KS), sims.shape[1]), dim=1).indices  # (Q, 10)
    hits = same.gather(1, top)  # (Q, 10)
    return {k: hits[:, :k].any(1).float().mean().item() for k in KS}


def reranked(model, proc, images: list, texts: list[str], sims: torch.Tensor, k: int, batch_size: int,
             texts_ask: bool = False) -> torch.Tensor:
    """`sims` (queries, candidates) with each query's top `k` candidates re-ordered by image–text
    matching (BLIP's re-ranking: the match log-probability of `model.match` decides among the
    contrastive top k, which stay above the rest). Queries are images (candidates texts), or texts
    when `texts_ask` (then `sims` is text by image)."""
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices  # (Q, k)
    pairs = [(j, i) if texts_ask else (i, j) for i in range(sims.shape[0]) for j in top[i].tolist()]  # (image, text)
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = proc.pairs([images[i] for i, _ in chunk], [texts[j] for _, j in chunk])
        scores.append(model.match(batch["pixel_values"], batch["input_ids"]).float())
    by_match = top.gather(1, torch.cat(scores).view(top.shape).argsort(dim=1, descending=True))
    above = sims.max() + torch.arange(top.shape[1], 0, -1, dtype=sims.dtype)  # k, k-1, ..., 1 above every similarity
    return sims.clone().scatter_(1, by_match, above.expand_as(top).contiguous())


def _recalls(sims: torch.Tensor, same: torch.Tensor, model, proc, images, texts, k: int, batch_size: int) -> dict:
    """R@1/5/10 both ways by contrastive similarity, and with `k` > 0 after re-ranking each query's
    top k by image–text matching (`i2t_itm_r@K`, `t2i_itm_r@K`)."""
    out = {}
    for name, (s, m) in {"i2t": (sims, same), "t2i": (sims.T, same.T)}.items():
        out |= {f"{name}_r@{n}": v for n, v in recall_at_k(s, m).items()}
    if k:
        with torch.no_grad():
            i2t = reranked(model, proc, images, texts, sims, k, batch_size)
            t2i = reranked(model, proc, images, texts, sims.T, k, batch_size, texts_ask=True)
        for name, (s, m) in {"i2t": (i2t, same), "t2i": (t2i, same.T)}.items():
            out |= {f"{name}_itm_r@{n}": v for n, v in recall_at_k(s, m).items()}
    return out


def retrieval(model, proc, world: ShapesWorld, split: str, n: int, batch_size: int,
              rerank: int = 0) -> tuple[dict[str, float], list[dict]]:
    samples = [world.sample(split, i) for i in range(n)]
    texts = [pair_text(s) for s in samples]
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    text_id = torch.tensor([ids[t] for t in texts])
    same = text_id[:, None] == text_id[None, :]  # (n, n), symmetric
    images = [s.image for s in samples]
    sims = model.similarity(embed_images(model, proc, images, batch_size), embed_texts(model, proc, texts, batch_size))
    out = _recalls(sims, same, model, proc, images, texts, rerank, batch_size)
    out["retrieval_unique_texts"] = float(len(ids)) / n  # share of distinct captions among the n pairs
    best = sims.argmax(1).tolist()
    predictions = [{"id": f"{split}/{i}", "prediction": texts[j], "reference": texts[i], "correct": texts[j] == texts[i]}
                   for i, j in enumerate(best)]
    return out, predictions


@torch.no_grad()
def retrieval_on(model, proc, data, cfg) -> tuple[dict[str, float], list[dict]]:
    """R@1/5/10 both ways on a CaptionedSet (eval/captioned.py), several captions per image: an
    image is found when any of its captions ranks in the top K; a caption when its image does."""
    d, images, captions, owner, keys = cfg.data, [], [], [], []
    for key, raw, caps in tqdm(data.items(), desc="retrieval", unit="image", disable=not sys.stderr.isatty()):
        try:
            images.append(open_within(raw, d)[0])
        except BadSample as e:
            data.log.skip(e.reason, key, e.detail)
            continue
        keys.append(key)
        owner += [len(keys) - 1] * len(caps)
        captions += caps
    if not images:
        raise UserError(f"--data {data.name}: no usable image (skipped: {dict(data.log.skipped)})")
    sims = model.similarity(embed_images(model, proc, images, cfg.eval.batch_size),
                            embed_texts(model, proc, captions, cfg.eval.batch_size))
    owner_t = torch.tensor(owner)
    same = torch.arange(len(images))[:, None] == owner_t[None, :]  # (images, captions)
    out = _recalls(sims, same, model, proc, images, captions, cfg.eval.itm_rerank, cfg.eval.batch_size)
    best = sims.argmax(1).tolist()
    predictions = [{"id": key, "prediction": captions[j], "reference": [c for c, o in zip(captions, owner) if o == i],
                    "correct": owner[j] == i} for i, (key, j) in enumerate(zip(keys, best))]
    return out, predictions
