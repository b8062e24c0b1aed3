"""Masked language modelling for a dual encoder's text tower (BERT, Devlin et al. 2019):
`contrastive.mlm_prob` > 0 (BERT: 0.15); with `contrastive.mlm_on=fusion`, of the image–text fusion
encoder (the ITM layers reading the corrupted caption and the image: ALBEF, BLIP), so that the
image helps predict the masked words.

Of each caption's real tokens (not <bos>, <eos> or padding) each is chosen with probability
`prob`; of the chosen, 80 % are replaced by a learned [MASK] vector at the embedding (the world's
tokenizer has no mask token, so the mask lives in this module, as the Q-Former's task tokens do),
10 % by a random token of the vocabulary and 10 % are left as they are. The tower reads the
corrupted caption bidirectionally and a head (dense, GELU, LayerNorm, vocabulary projection, as
BERT's) predicts each chosen token; `mlm` is the cross-entropy summed over them (a local sum,
counted over the chosen tokens). The choice is drawn from a generator seeded by the batch's ids,
so it is a pure function of the batch: `loss_counts` recounts it, a resumed run masks as an
uninterrupted one did, and counting FLOPs does not move the global RNG.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from graft.losses import at_least_fp32
from graft.models.text_encoder import TextConfig, TextTower


class MaskedLM(nn.Module):
    def __init__(self, text: TextConfig, prob: float, special: tuple[int, ...]):
        super().__init__()
        d, self.prob, self.vocab = text.hidden_size, prob, text.vocab_size
        self.register_buffer("special", torch.tensor(special), persistent=False)
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=text.layer_norm_eps),
                                  nn.Linear(d, text.vocab_size))

    def corrupt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen (B, L) bool, masked (B, L) bool: the chosen replaced by [MASK], ids with the random
        replacements written in)."""
        gen = torch.Generator().manual_seed(zlib.crc32(input_ids.cpu().numpy().tobytes()))
        u = torch.rand(input_ids.shape, generator=gen)
        kind = torch.rand(input_ids.shape, generator=gen)
        random_ids = torch.randint(0, self.vocab, input_ids.shape, generator=gen)
        real = ~torch.isin(input_ids.cpu(), self.special.cpu())
        chosen = real & (u < self.prob)
        masked, swapped = chosen & (kind < 0.8), chosen & (kind >= 0.8) & (kind < 0.9)
        ids = torch.where(swapped, random_ids, input_ids.cpu())
        device = input_ids.device
        return chosen.to(device), masked.to(device), ids.to(device)

    def count(self, input_ids: torch.Tensor) -> int:
        return int(self.corrupt(input_ids)[0].sum())

    def loss(self, tower: TextTower, input_ids: torch.Tensor, fuse=None) -> torch.Tensor:
        """Σ over the chosen tokens of -log p(the original token | the corrupted caption); with `fuse`
        (states, ids → states: the image–text fusion encoder, ALBEF's and BLIP's MLM), | the caption
        and the image."""
        chosen, masked, ids = self.corrupt(input_ids)
        states = tower.states(ids, (masked, self.mask_embedding))
        if fuse is not None:
            states = fuse(states, ids)
        logits = self.head(states[chosen])
        return F.cross_entropy(at_least_fp32(logits), input_ids[chosen], reduction="sum")
