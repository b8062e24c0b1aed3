"""Image→text and text→image retrieval with a dual encoder: Recall@K over n image–caption pairs.

Pair i is image i of the split and its caption. Several Shapes images can share a caption word
for word (e.g. two single-object scenes "a small red circle" in different cells): such texts are
indistinguishable, so a retrieved item counts as correct when its caption equals the query's pair
caption, not only when it is the very same index.
"""

from __future__ import annotations

import torch

from graft.data.contrastive import pair_text
from graft.data.shapes import ShapesWorld
from graft.eval.zero_shot import embed_images, embed_texts

KS = (1, 5, 10)


def recall_at_k(sims: torch.Tensor, same: torch.Tensor) -> dict[int, float]:
    """sims (Q, N) query-by-candidate scores; same (Q, N) True where candidate j is a right answer."""
    top = sims.topk(min(max(KS), sims.shape[1]), dim=1).indices  # (Q, 10)
    hits = same.gather(1, top)  # (Q, 10)
    return {k: hits[:, :k].any(1).float().mean().item() for k in KS}


def retrieval(model, proc, world: ShapesWorld, split: str, n: int, batch_size: int) -> dict[str, float]:
    samples = [world.sample(split, i) for i in range(n)]
    texts = [pair_text(s) for s in samples]
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    text_id = torch.tensor([ids[t] for t in texts])
    same = text_id[:, None] == text_id[None, :]  # (n, n), symmetric
    sims = embed_images(model, proc, [s.image for s in samples], batch_size) @ embed_texts(model, proc, texts, batch_size).T
    out = {}
    for name, (s, m) in {"i2t": (sims, same), "t2i": (sims.T, same.T)}.items():
        out |= {f"{name}_r@{k}": v for k, v in recall_at_k(s, m).items()}
    out["retrieval_unique_texts"] = float(len(ids)) / n  # share of distinct captions among the n pairs
    return out
