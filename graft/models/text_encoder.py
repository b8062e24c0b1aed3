"""Text tower of a dual encoder: token + position embeddings → the ViT's pre-LN encoder blocks →
final LayerNorm → one vector per text.

Pooling follows the papers: CLIP (Radford et al. 2021) uses causal attention and takes the
end-of-text token; SigLIP (Zhai et al. 2023; HF `SiglipTextModel`) attends bidirectionally over
texts padded to a fixed length and takes the last position. Module names follow HF's CLIP/SigLIP
text models (`token_embedding`, `position_embedding`, `encoder.layers.N`, `final_layer_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import UserError
from graft.models.vit import Encoder, _init_weights

POOLS = ("last", "eos")


@dataclass
class TextConfig:
    vocab_size: int = 0  # 0: the tokenizer's size, resolved when the model is built
    max_len: int = 32  # texts are truncated (keeping <eos>) and padded to this many tokens
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    layer_norm_eps: float = 1e-6
    causal: bool = False  # CLIP: true (with pool=eos); SigLIP: false (with pool=last)
    pool: str = "last"  # last | eos

    @staticmethod
    def check(cfg: "TextConfig") -> None:
        if cfg.pool not in POOLS:
            raise UserError(f"text.pool={cfg.pool!r} is not one of {', '.join(POOLS)}")
        if cfg.hidden_size % cfg.heads:
            raise UserError(f"text.hidden_size={cfg.hidden_size} is not divisible by text.heads={cfg.heads}")
        if cfg.max_len < 2:
            raise UserError(f"text.max_len={cfg.max_len} must be at least 2")


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, eos_id: int):
        super().__init__()
        self.cfg, self.eos_id = cfg, eos_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.hidden_size)
        self.encoder = Encoder(cfg)  # the ViT's blocks: same fields (hidden_size, heads, ...)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids → (B, D) pooled text features."""
        return self.pool(self.states(input_ids), input_ids)

    def states(self, input_ids: torch.Tensor, replace: tuple | None = None) -> torch.Tensor:
        """(B, L) token ids → (B, L, D) features of every token, after the final norm. `replace`:
        (where (B, L) bool, vector (D,)): those tokens' embeddings are the vector (MLM's [MASK])."""
        tokens = self.token_embedding(input_ids)
        if replace is not None:
            where, vector = replace
            tokens = torch.where(where[..., None], vector.to(tokens.dtype), tokens)
        x = tokens + self.position_embedding.weight[: input_ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x, causal=self.cfg.causal)
        return self.final_layer_norm(x)

    def pool(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) → (B, D): the first <eos>'s features (pool=eos) or the last position's."""
        if self.cfg.pool == "eos":
            at = (input_ids == self.eos_id).int().argmax(1)  # first <eos>; the processor always writes one
            return x[torch.arange(x.shape[0], device=x.device), at]
        return x[:, -1]
