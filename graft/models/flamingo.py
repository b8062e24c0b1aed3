"""Flamingo: the language model reads images through gated cross-attention blocks between its layers.

`model: flamingo` (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot
Learning", §2.2 and Fig. 4). The images go through the vision tower and the connector
(`connector.kind=resampler`: the Perceiver Resampler's N latents per image, at the LM's width) and
are *not* put into the text: each image stands there as one `<image>` token, whose position says
which text it belongs to. Before every `flamingo.every`-th decoder layer (layers 0, k, 2k, ...) a
block lets each text token attend to the latents of the image at or before it that is nearest
(`flamingo.attend: previous`, Flamingo's choice) or of all images at or before it (`all`); a token
with no image before it gets nothing from the attention (the block's MLP still runs on it, as in
Flamingo and IDEFICS). The block's attention and MLP outputs join the residual
stream through tanh(α) gates with α = 0 at initialisation, so an untrained Flamingo computes the
text-only LM's output bit for bit (tested); `flamingo.gate: none` drops the gates (Flamingo's
Table 3 ablation). The LM may be frozen (`train.freeze: [vision, lm]`, Flamingo's recipe),
LoRA-adapted or trained; the blocks are their own part, `xattn`.

The block is Hugging Face's `IdeficsGatedCrossAttentionLayer` (IDEFICS, the open Flamingo
reproduction) with `alpha_type="float"` and no q/k norms: same parameter names, same outputs
(tests/test_flamingo.py). Cost per block and text token: the q and output maps and the MLP as in
a decoder layer, attention over K = images x N latents instead of the text; the keys and values
are computed once per image token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import KVCache, LanguageModel, Layout, LMConfig
from graft.models.modality import IMAGES, Modality
from graft.models.layers import RMSNorm, SwiGLU
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM, _check_placeholders

ATTEND = ("previous", "all")
GATES = ("tanh", "none")


@dataclass
class Media:
    """What the blocks read, built per forward call: `tokens` (B, K, D) of the images each row holds,
    `mask` (B, 1, T, K) True where a position may see a token, `seen` (B, T) whether it sees any."""

    tokens: torch.Tensor
    mask: torch.Tensor
    seen: torch.Tensor


@dataclass
class FlamingoConfig:
    every: int = 1  # a gated cross-attention block before every `every`-th LM layer (0, k, 2k, ...)
    attend: str = "previous"  # previous: the nearest image at or before a token | all: every such image
    gate: str = "tanh"  # tanh: tanh(α)-gated residuals, α = 0 at init | none: plain residuals (ablation)

    @staticmethod
    def check(cfg: FlamingoConfig, lm_layers: int | None = None) -> None:
        if cfg.every < 1:
            raise UserError(f"flamingo.every={cfg.every} must be at least 1")
        if lm_layers is not None and cfg.every > lm_layers:
            raise UserError(f"flamingo.every={cfg.every} exceeds lm.layers={lm_layers}: only layer 0 would get a block")
        if cfg.attend not in ATTEND:
            raise UserError(f"flamingo.attend={cfg.attend!r} is not one of {', '.join(ATTEND)}")
        if cfg.gate not in GATES:
            raise UserError(f"flamingo.gate={cfg.gate!r} is not one of {', '.join(GATES)}")


class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the image tokens (HF `IdeficsAttention` with
    `is_cross_attention=True`): no rotary positions, full heads."""

    def __init__(self, dim: int, media_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(media_dim, dim, bias=False)
        self.v_proj = nn.Linear(media_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, dim) → (B, heads, L, head_dim)
            return t.view(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(media)),
                                           split(self.v_proj(media)), attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class GatedCrossAttentionBlock(nn.Module):
    """x + g_a · xattn(norm(x), images), then + g_m · mlp(norm(·)); g = tanh(α), α = 0 at init
    (HF `IdeficsGatedCrossAttentionLayer`)."""

    def __init__(self, lm: LMConfig, media_dim: int, gated: bool = True):
        super().__init__()
        d = lm.hidden_size
        self.input_layernorm = RMSNorm(d, lm.rms_norm_eps)
        self.cross_attn = CrossAttention(d, media_dim, lm.heads)
        self.post_attention_layernorm = RMSNorm(d, lm.rms_norm_eps)
        self.mlp = SwiGLU(d, lm.intermediate_size, d)
        self.gated = gated
        if gated:
            self.alpha_cross_attn = nn.Parameter(torch.zeros(1))
            self.alpha_dense = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: Media) -> torch.Tensor:
        # a token that sees no image attends everywhere (no empty softmax), and its output is zeroed
        mask = media.mask | ~media.seen[:, None, :, None]
        h = self.cross_attn(self.input_layernorm(x), media.tokens, mask)
        h = h.masked_fill(~media.seen[..., None], 0.0)
        x = x + (torch.tanh(self.alpha_cross_attn) * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (torch.tanh(self.alpha_dense) * h if self.gated else h)


def visible(count: torch.Tensor, images: int, attend: str) -> torch.Tensor:
    """(B, T, images) bool: which of its row's images each position sees, given `count` (B, T), the
    images at or before it."""
    j = torch.arange(images, device=count.device)
    return j == count[..., None] - 1 if attend == "previous" else j < count[..., None]


class Flamingo(VLM):
    """VLM's vision tower and connector; the image tokens reach the LM through `xattn` blocks."""

    def __init__(self, vision: VisionConfig | nn.Module, connector: ConnectorConfig, lm: LMConfig | nn.Module,
                 image_token_id: int, cfg: FlamingoConfig, modality: Modality = IMAGES):
        super().__init__(vision, connector, lm, image_token_id, modality)
        if not isinstance(self.lm, LanguageModel):
            raise UserError("model=flamingo needs the built-in decoder (with lm.hf_path, set lm.builtin=true)")
        lm = self.lm.cfg
        self.cfg = cfg
        self.at = list(range(0, lm.layers, cfg.every))  # the LM layers a block runs before
        self.xattn = nn.ModuleList(GatedCrossAttentionBlock(lm, lm.hidden_size, cfg.gate == "tanh") for _ in self.at)

    @property
    def num_image_tokens(self) -> int:
        return 1  # one <image> token per image in the text

    def lm_inputs(self, input_ids, pixel_values, image_tokens, cache: KVCache | None, position_ids=None,
                  doc_ids=None, counts=None) -> dict:
        """The text's own embeddings (the <image> tokens included), the images as `Media`, and the
        packed rows' `Layout`; in packed rows (`doc_ids`) a token sees only its own document's images.
        Every image is one <image> token here: per-item `counts` are refused."""
        if counts is not None:
            raise ValueError("Flamingo reads images of one <image> token each: no per-item token counts")
        slots = input_ids == self.image_token_id
        if image_tokens is None and pixel_values is not None and pixel_values.shape[0]:
            image_tokens = self.image_tokens(pixel_values)  # (I, N, D)
        n_images = 0 if image_tokens is None else image_tokens.shape[0]
        _check_placeholders(slots, n_images, 1)
        media = self._media(slots, image_tokens, doc_ids) if n_images else None
        if cache is not None:
            cache.extra = media  # decoding steps see the images of their rows
        return {"inputs_embeds": self.lm.embed_tokens(input_ids), "cache": cache, "inserted": self.blocks(media),
                "layout": Layout(position_ids, doc_ids)}

    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        media = cache.extra
        if media is not None:  # the new token sees what the row's last position saw
            media = Media(media.tokens, media.mask[:, :, -1:], media.seen[:, -1:])
        return self.lm(input_ids=ids, cache=cache, inserted=self.blocks(media))

    def blocks(self, media: Media | None) -> dict | None:
        """The gated cross-attention blocks on `media`, by the LM layer each runs before."""
        return None if media is None else {i: partial(block, media=media) for i, block in zip(self.at, self.xattn)}

    def _media(self, slots: torch.Tensor, image_tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> Media:
        """Each row's images, padded to the most any row holds (B, M·N, D), and what each position sees."""
        B, (n_img, N, D) = slots.shape[0], image_tokens.shape
        per_row = slots.sum(1)  # (B,)
        M = int(per_row.max())
        row = torch.repeat_interleave(torch.arange(B, device=slots.device), per_row)  # image → its row
        first = torch.cumsum(per_row, 0) - per_row  # each row's first image
        tokens = image_tokens.new_zeros(B, M, N, D)
        tokens[row, torch.arange(n_img, device=slots.device) - first[row]] = image_tokens
        sees = visible(torch.cumsum(slots, 1), M, self.cfg.attend)  # (B, T, M)
        if doc_ids is not None:  # packed rows: an earlier document's image is not this one's
            image_doc = doc_ids.new_full((B, M), -1)
            image_doc[row, torch.arange(n_img, device=slots.device) - first[row]] = doc_ids[slots]
            sees = sees & (doc_ids[..., None] == image_doc[:, None, :])
        mask = sees.repeat_interleave(N, dim=-1)[:, None]  # (B, 1, T, M·N)
        return Media(tokens.view(B, M * N, D), mask, sees.any(-1))
