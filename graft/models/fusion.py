"""Text layers that also read image tokens: pre-LN self-attention over the text (causal for a
decoder, bidirectional for a matching encoder), cross-attention to the image tokens, MLP — CoCa's
multimodal decoder (models/coca.py) and the dual encoders' image–text matching head (models/itm.py).
Both take a TextConfig (width, heads, MLP size) and image tokens already in the text's width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graft.models.text_encoder import TextConfig
from graft.models.vit import MLP, Attention

class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the image tokens (both of the text's width)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(image)), split(self.v_proj(image)))
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class FusionLayer(nn.Module):
    """Pre-LN: self-attention (`causal` or bidirectional), cross-attention to the image tokens, MLP,
    each with a residual."""

    def __init__(self, cfg: TextConfig, causal: bool):
        super().__init__()
        self.causal = causal
        norm = lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layer_norm1, self.self_attn = norm(), Attention(cfg)
        self.layer_norm2, self.cross_attn = norm(), CrossAttention(cfg)
        self.layer_norm3, self.mlp = norm(), MLP(cfg)

    def forward(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, 1, 1, T): True = a text key that may be attended (bidirectional layers only)."""
        x = x + self.self_attn(self.layer_norm1(x), self.causal, mask)
        x = x + self.cross_attn(self.layer_norm2(x), image)
        return x + self.mlp(self.layer_norm3(x))
