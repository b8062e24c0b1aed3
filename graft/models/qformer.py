"""The BLIP-2 Querying Transformer (Q-Former), architecturally identical to Hugging Face `Blip2QFormerModel`.

Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models", §3.1 and Fig. 2. A BERT-style encoder (post-LayerNorm: x = LN(x + f(x)))
over a sequence that starts with N learned query tokens and may continue with text tokens:

- self-attention over the whole sequence, queries and text sharing it; what may attend to what
  is the caller's mask (ITC: queries and text apart; ITM: all bidirectional; ITG: queries among
  themselves, text causal and seeing every query);
- every `cross_attention_frequency` layers (layer i with i % frequency == 0), a cross-attention
  from the query positions only to the image features (keys and values from the image width);
- separate feed-forward networks for query positions (`intermediate_query` / `output_query`) and
  for text positions (`intermediate` / `output`, present only when the module has a text side).

The names are HF's (`layernorm`, `encoder.layer.N.attention.attention.query`, `...crossattention`,
`...intermediate_query.dense`, ...), so the state dict of `QFormerModel` is that of
`Blip2QFormerModel` key for key (`use_qformer_text_input=True` for the text FFNs), and
`TextEmbeddings` is `Blip2TextEmbeddings` (word + learned position embeddings, no norm: the
model's `layernorm` normalises [queries; text] together). Dropout is left out (graft trains
without it); HF in eval mode computes the same function.

Cost per image, d = width, N queries, T text tokens, P patches: self-attention O((N + T)²·d) and
projections O((N + T)·d²) per layer; cross-attention O(N·P·d + P·d_v·d) per cross layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.models.connector_config import ConnectorConfig
from graft.models.qformer_config import QFormerConfig  # noqa: F401 (re-exported: the Q-Former's config)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with biased projections (HF `Blip2QFormerMultiHeadAttention`)."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_dim, cfg.hidden_size)
        self.value = nn.Linear(kv_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d) attends to context (B, S, d_kv); mask (B, 1, T, S) bool, True = may attend."""
        B, T, _ = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)),
                                           split(self.value(context)), attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, -1)


class AddNorm(nn.Module):
    """LN(x + dense(h)): BERT's post-norm residual (HF `Blip2QFormerSelfOutput` / `Blip2QFormerOutput`)."""

    def __init__(self, cfg: QFormerConfig, in_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class Attention(nn.Module):
    """Attention then add & norm (HF `Blip2QFormerAttention`)."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_dim)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x, context, mask=None):
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    """dense → GELU (erf), HF `Blip2QFormerIntermediate` with hidden_act="gelu"."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text]; cross-attention of the queries to the image (this layer
    has one when index % frequency == 0); one FFN for query positions, another for text positions."""

    def __init__(self, cfg: QFormerConfig, index: int, image_dim: int, text: bool):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, image_dim)
        if text:
            self.intermediate, self.output = Intermediate(cfg), AddNorm(cfg, cfg.intermediate_size)
        self.intermediate_query, self.output_query = Intermediate(cfg), AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x, mask, image, n_queries: int) -> torch.Tensor:
        """x (B, N + T, d), mask (B, 1, N + T, N + T) or None, image (B, P, d_v) → (B, N + T, d)."""
        x = self.attention(x, x, mask)
        q, t = x[:, :n_queries], x[:, n_queries:]
        if n_queries and self.has_cross_attention:
            q = self.crossattention(q, image)  # every patch is real: no mask
        q = self.output_query(self.intermediate_query(q), q)
        if t.shape[1]:
            if not hasattr(self, "intermediate"):
                raise ValueError("this Q-Former has no text side (built with text=False)")
            t = self.output(self.intermediate(t), t)
        return torch.cat([q, t], dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_dim: int, text: bool):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i, image_dim, text) for i in range(cfg.layers))


class QFormerModel(nn.Module):
    """HF `Blip2QFormerModel`: LayerNorm over the input embeddings, then the layers. The first
    `n_queries` positions of `embeds` are queries (cross-attending to `image`), the rest text."""

    def __init__(self, cfg: QFormerConfig, image_dim: int, text: bool = True):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg, image_dim, text)

    def forward(self, embeds: torch.Tensor, n_queries: int, image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, N + T, d); image (B, P, d_v), needed when n_queries > 0; mask: None (all
        attend to all), (B, N + T) key padding (True = real token) or (B, N + T, N + T) True =
        row may attend to column. Returns (B, N + T, d)."""
        if n_queries and image is None:
            raise ValueError("the queries cross-attend to image features: pass `image`")
        if mask is not None:
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]  # (B, 1, ·, N + T)
        x = self.layernorm(embeds)
        if image is not None:
            image = image.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image, n_queries)
        return x


class TextEmbeddings(nn.Module):
    """Word + learned position embeddings (HF `Blip2TextEmbeddings`); no norm of its own."""

    def __init__(self, cfg: QFormerConfig, vocab_size: int, max_positions: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, T, d)."""
        return self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]


def init_weights(module: nn.Module, std: float) -> None:
    """Normal weights, zero biases, unit norms (BERT's scheme; its std is 0.02, see `init_std`)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_std(cfg: QFormerConfig) -> float:
    """1/sqrt(width), not BERT's 0.02 (BLIP-2 starts from a pretrained BERT; graft from scratch).
    At width 128 with std 0.02 attention stays uniform, every text's [CLS] starts the same (cosine
    0.9998) and ITC was still 3.3-4.6 (log 64 = 4.16) after 100 steps of shapes_qformer_stage1;
    with 1/sqrt(128) it was 0.52 (measured, lr 1e-3, no warmup). As graft's LM (`lm.init_std`)."""
    return cfg.hidden_size ** -0.5


class QueryEncoder(nn.Module):
    """What stage 1 and the stage-2 connector share: `ln_vision` (BLIP-2 normalises the frozen
    encoder's features before the Q-Former), N learned `query_tokens` (1, N, d) and the Q-Former.
    `forward(features)` is the query side alone: (B, P, d_v) → (B, N, d)."""

    def __init__(self, cfg: QFormerConfig, image_dim: int, text: bool):
        super().__init__()
        self.ln_vision = nn.LayerNorm(image_dim)
        # N(0, 0.02) as BLIP-2 (LAVIS) starts them; identical queries would stay identical
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.queries, cfg.hidden_size) * 0.02)
        self.qformer = QFormerModel(cfg, image_dim, text)
        self.qformer.apply(lambda m: init_weights(m, init_std(cfg)))

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def image(self, features: torch.Tensor) -> torch.Tensor:
        """The image side the queries cross-attend to: (B, P, d_v), normalised."""
        return self.ln_vision(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.image(features)
        queries = self.query_tokens.expand(image.shape[0], -1, -1).to(image.dtype)
        return self.qformer(queries, self.num_queries, image)  # (B, N, d)


class QFormerConnector(QueryEncoder):
    """BLIP-2 stage 2 as a connector (`connector.kind=qformer`): the Q-Former's query side over the
    vision features, then a linear map to the LM width (HF `Blip2ForConditionalGeneration`'s
    `language_projection`). N = `connector.qformer.queries` image tokens whatever the patch count.
    `connector.init_from` starts it (and the image encoder) from a stage-1 run (models/blip2.py)."""

    grid = False  # its tokens are learned queries, not places in the image

    def __init__(self, vision_dim: int, lm_dim: int, cfg: ConnectorConfig):
        self.check(cfg)
        super().__init__(cfg.qformer, vision_dim, text=False)
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, lm_dim)  # PyTorch's default init

    @staticmethod
    def check(cfg: ConnectorConfig, num_patches: int | None = None, lm_dim: int | None = None) -> None:
        QFormerConfig.check(cfg.qformer, "connector.qformer")
        default = QFormerConfig()
        for name in ("embed_dim", "max_text_len"):  # the text side's and ITC's: stage 1 only
            if getattr(cfg.qformer, name) != getattr(default, name):
                raise UserError(f"connector.qformer.{name}={getattr(cfg.qformer, name)} is read by "
                                "model=qformer_stage1 only (the stage-2 connector has no text side)")

    def num_tokens(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.language_projection(super().forward(features))  # (B, P, D_v) → (B, N, d) → (B, N, D_lm)
