"""Image–text matching for dual encoders (ALBEF, Li et al. 2021; BLIP, Li et al. 2022), with hard
negatives: `contrastive.itm_layers` > 0.

A small fusion encoder reads a caption's text-tower states, each layer attending over the caption
(bidirectionally, pad tokens masked) and to the image's patch tokens (mapped to the text's width);
a 2-way head on the state at the caption's first <eos> says whether the caption belongs to the
image. Per micro-batch of B pairs: the B positives, for each image one negative caption and for
each caption one negative image, drawn with probability softmax(similarity) over the batch (the
positive and identical captions excluded: `models.blip2.hard_negatives`, seeded by the batch, so
a resumed run draws what an uninterrupted one did). `itm` is the cross-entropy summed over the 3B
pairs (a local sum, counted 3B). Negatives come from this process's micro-batch, as BLIP-2's do
here (ALBEF samples from the gathered batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graft.losses import at_least_fp32
from graft.models.blip2 import hard_negatives
from graft.models.fusion import FusionLayer
from graft.models.text_encoder import TextConfig
from graft.models.vit import _init_weights


class ImageTextMatching(nn.Module):
    def __init__(self, text: TextConfig, image_width: int, layers: int, eos_id: int, pad_id: int):
        super().__init__()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.image_to_text = nn.Linear(image_width, text.hidden_size)
        self.layers = nn.ModuleList(FusionLayer(text, causal=False) for _ in range(layers))
        self.norm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
        self.head = nn.Linear(text.hidden_size, 2)
        self.apply(_init_weights)

    def fuse(self, patches: torch.Tensor, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The fusion encoder: the captions' text-tower states (B, L, D) attending over the caption and to
        the image's patch tokens (B, P, Dv) → (B, L, D), normed (also what `contrastive.mlm_on=fusion` reads)."""
        x, image = states, self.image_to_text(patches)
        keys = (input_ids != self.pad_id)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, image, keys)
        return self.norm(x)

    def logits(self, patches: torch.Tensor, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Image patch tokens (B, P, Dv), the captions' text-tower states (B, L, D) and ids (B, L) → (B, 2):
        [no match, match] logits of each (image, caption) row."""
        x = self.fuse(patches, states, input_ids)
        at = (input_ids == self.eos_id).int().argmax(1)
        return self.head(x[torch.arange(x.shape[0], device=x.device), at])

    def loss(self, patches: torch.Tensor, states: torch.Tensor, input_ids: torch.Tensor,
             similarity: torch.Tensor) -> torch.Tensor:
        """Σ over the 3B pairs of the cross-entropy of match / no match; `similarity` (B, B) image i vs
        caption j, from which the hard negatives are drawn."""
        if input_ids.shape[0] < 2:
            raise ValueError("image–text matching needs at least 2 pairs per micro-batch for its negatives")
        with torch.no_grad():
            neg_text, neg_image = hard_negatives(similarity, input_ids)
        # index_select, not indexing: its backward is deterministic on CPU threads (see blip2.py)
        images = torch.cat([patches, patches, patches.index_select(0, neg_image)])
        texts = torch.cat([states, states.index_select(0, neg_text), states])
        ids = torch.cat([input_ids, input_ids.index_select(0, neg_text), input_ids])
        logits = self.logits(images, texts, ids)
        B = input_ids.shape[0]
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return F.cross_entropy(at_least_fp32(logits), labels, reduction="sum")
