"""What `graft serve` computes for a dual encoder (clip, siglip, clippo, lit, qformer_stage1):
embeddings of texts and images, and a zero-shot ranking of labels for an image (docs/serve.md).

graft/serve.py checks the HTTP request and decodes its images; this module runs the model, with
the same calls graft's evaluation makes (eval/zero_shot.py): `encode_text` / `encode_image` give
L2-normalised embeddings, labels are embedded through prompt templates averaged per label (CLIP
§3.1.4's ensemble), and `similarity` scores the image against them.
"""

from __future__ import annotations

import base64
import threading

import torch

from graft.data.sources import source_kind
from graft.eval.zero_shot import USER_TEMPLATES, class_embeddings

BATCH = 64  # texts or images per forward pass


def default_templates(cfg) -> list[str]:
    """The templates graft's zero-shot evaluation uses by default: those of the source the run
    trained on (the built-in world's caption style), else CLIP's "a photo of a {}."."""
    return list(source_kind(cfg).label_templates or USER_TEMPLATES)


class Embedder:
    """A loaded dual-encoder run (graft.api.Run); the model runs behind `lock`, one request at a time."""

    def __init__(self, run, lock: threading.Lock):
        self.model, self.proc, self.lock = run.model, run.processor, lock
        self.device = next(run.model.parameters()).device

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(n, E) text embeddings, L2-normalised by the model."""
        out = []
        with self.lock:
            for i in range(0, len(texts), BATCH):
                batch = self.proc.texts(texts[i:i + BATCH])
                out.append(self.model.encode_text(**{k: v.to(self.device) for k, v in batch.items()}).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """(n, E) image embeddings, or (n, N, E) for a Q-Former (one per query), L2-normalised by the model."""
        out = []
        with self.lock:
            for i in range(0, len(images), BATCH):
                pixels = torch.stack([self.proc.pixels(im) for im in images[i:i + BATCH]]).to(self.device)
                out.append(self.model.encode_image(pixels).float().cpu())
        return torch.cat(out)

    def text_tokens(self, texts: list[str]) -> int:
        """Tokens the text tower reads (each text cut to its length, <eos> included; padding not)."""
        return sum(min(len(self.proc.tok.encode(t)), self.proc.max_seq_len - 1) + 1 for t in texts)

    def embeddings(self, inputs: list, base64_floats: bool) -> list[dict]:
        """OpenAI's `data` of /v1/embeddings for `inputs` (strings and PIL images, in order)."""
        texts = [x for x in inputs if isinstance(x, str)]
        images = [x for x in inputs if not isinstance(x, str)]
        text_emb = iter(self.texts(texts)) if texts else iter(())
        image_emb = iter(self.images(images)) if images else iter(())
        rows = [next(text_emb) if isinstance(x, str) else next(image_emb) for x in inputs]
        encode = ((lambda e: base64.b64encode(e.numpy().astype("<f4").tobytes()).decode()) if base64_floats
                  else (lambda e: e.tolist()))
        return [{"object": "embedding", "index": i, "embedding": encode(e)} for i, e in enumerate(rows)]

    @torch.no_grad()
    def zero_shot(self, image, labels: list[str], templates: list[str]) -> list[dict]:
        """`labels` ranked for `image`, best first: each with the model's similarity and its probability,
        softmax over the labels of similarity x the learned temperature (clamped at 100, CLIP §2.5)."""
        with self.lock:
            text = class_embeddings(self.model, self.proc, labels, templates, BATCH)  # (C, E)
        image_emb = self.images([image])  # (1, E) or (1, N, E)
        sims = self.model.similarity(image_emb, text)[0]  # (C,)
        scale = self.model.logit_scale.detach().float().cpu().exp().clamp(max=100.0)
        probs = torch.softmax(scale * sims, dim=0)
        order = sims.argsort(descending=True, stable=True).tolist()
        return [{"label": labels[i], "probability": probs[i].item(), "similarity": sims[i].item()} for i in order]
