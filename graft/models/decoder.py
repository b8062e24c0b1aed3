"""Decoder-only language model, architecturally identical to Hugging Face `LlamaForCausalLM`.

RMSNorm (computed in fp32) → grouped-query attention with rotary position embeddings (RoPE,
rotate-half convention) via `scaled_dot_product_attention` → RMSNorm → SwiGLU MLP; final RMSNorm
and an LM head, optionally tied to the token embeddings. A `KVCache` makes generation linear in
length. Module names follow HF with the `model.` prefix dropped (see `models/hf.py`).

Every layer gets one `Context` per forward call — rotary tables, the attention mask, per-token
modality ids, and a dict where a layer may add an auxiliary loss — built by `LanguageModel.forward`
from the rows' `Layout` and passed down explicitly, never stored on a module between calls. The
decoder knows nothing of images: the model that lays its rows out gives the positions (1-D, or on
M-RoPE's three axes) and the pairs beyond causal that may attend (models/image_layout.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.models import moe
from graft.models.context import Context
from graft.models.layers import RMSNorm
from graft.models.lm_config import LMConfig  # noqa: F401 (re-exported: the decoder's config)
from graft.models.modality import TEXT, image_twins

def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, T, head_dim) for integer `positions` (B, T); RoFormer, Su et al. 2021.
    Positions (3, B, T) on (time, row, column) axes rotate frequency pair j by axis j % 3 (M-RoPE)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    if positions.dim() == 3:  # each frequency pair takes its axis' position
        positions = positions[torch.arange(head_dim // 2, device=positions.device) % 3].permute(1, 2, 0)
        freqs = positions.float() * inv_freq  # (B, T, head_dim/2)
    else:
        freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, H, T, head_dim) by the tables of `rope_tables` (B, T, head_dim)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


@dataclass
class Layout:
    """Where each token of the rows sits, which sets the decoder's positions and mask; built per
    call by the model that lays the rows out (VLM.lm_inputs). `position_ids`: (B, T), or (3, B, T)
    on M-RoPE's (time, row, column) axes; packed rows (data/packing.py) restart them at each
    document and give `doc_ids` (B, T): attention is then causal within a document and blind across
    documents. `visible` (B, T, T): pairs that may attend beyond causal (an image's tokens seeing
    each other). `modality_ids` (B, T): TEXT, IMAGE or SERIES (models/modality.py), for the layers
    whose modules differ by modality."""

    position_ids: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    visible: torch.Tensor | None = None


class KVCache:
    """Keys and values of every layer seen so far: lists of (B, kv_heads, T, head_dim); and what
    the model keeps between decoding steps beside them (`extra`: Flamingo's images of each row)."""

    def __init__(self):
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.extra: object = None

    def seen(self, layer: int = 0) -> int:
        """Positions already cached for `layer`."""
        return 0 if len(self.k) <= layer or self.k[layer] is None else self.k[layer].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def gqa_in_kernel(device: torch.device, masked: bool) -> bool:
    """Whether attention serves grouped kv heads inside the SDPA kernel (enable_gqa) rather than
    by repeating k and v: on CPUs (22 % less attention time at the demo size, forward + backward,
    measured), and on GPUs without a mask (with one, CUDA's kernels would fall back to the math
    path, as transformers' `use_gqa_in_sdpa` notes)."""
    return device.type == "cpu" or not masked


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, index: int):
        super().__init__()
        self.index, self.heads, self.kv_heads = index, cfg.heads, cfg.kv_heads
        self.head_dim = cfg.hidden_size // cfg.heads
        d, dkv = cfg.hidden_size, cfg.kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, dkv, bias=False)
        self.v_proj = nn.Linear(d, dkv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, ctx: Context, cache: KVCache | None) -> torch.Tensor:
        """`ctx.mask` (B, 1, T, T), True = may attend: packed documents, image tokens seeing their
        whole image (training and prefill; a cached decoding step passes none)."""
        B, T, _ = x.shape
        cos, sin, mask = ctx.cos, ctx.sin, ctx.mask
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.seen(self.index)
            k, v = cache.update(self.index, k, v)
        gqa = self.kv_heads != self.heads  # each kv head serves heads / kv_heads query heads
        if gqa and not gqa_in_kernel(x.device, mask is not None or (past > 0 and T > 1)):
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            gqa = False
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a prefix: causal within the chunk, full view of the past
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        """SwiGLU (Shazeer 2020); every token alike, so `ctx` is not read (an MoE FFN's is)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One Llama block: x + attention(RMSNorm(x)), then x + FFN(RMSNorm(x)). The FFN is SwiGLU, or
    a mixture of experts on the layers `lm.moe_*` names (models/moe.py)."""

    def __init__(self, cfg: LMConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if moe.is_moe_layer(cfg, index):
            self.mlp = moe.MoE(cfg)  # built after the MLP it replaces, as always: the same seed, the same weights

    def forward(self, x, ctx: Context, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class ModalityLayer(DecoderLayer):
    """A Llama block whose image tokens have their own norms and/or FFN (`lm.modality_norms` /
    `lm.modality_ffn`; EVEv2, VLMo): each `<text module>_image` beside its text twin, applied
    where `ctx.modality_ids` is not TEXT (models/modality.py): the tokens of the model's one other
    modality, an image's or a series'."""

    def __init__(self, cfg: LMConfig, index: int):
        super().__init__(cfg, index)
        if cfg.modality_norms:
            self.input_layernorm_image = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_image = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.modality_ffn:
            if isinstance(self.mlp, moe.MoE):
                raise UserError("lm.moe_experts and lm.modality_ffn both replace the FFN: choose one")
            self.mlp_image = MLP(cfg)

    def forward(self, x, ctx: Context, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self._by_modality("input_layernorm", x, ctx), ctx, cache)
        return x + self._by_modality("mlp", self._by_modality("post_attention_layernorm", x, ctx), ctx)

    def _by_modality(self, name: str, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Module `name` on the text tokens and `name`_image, where there is one, on the image tokens."""
        text, image = getattr(self, name), getattr(self, f"{name}_image", None)
        if image is None or ctx.modality_ids is None:
            return text(x, ctx) if isinstance(text, moe.MoE) else text(x)  # an MoE routes each token itself
        at = ctx.modality_ids != TEXT  # (B, T)
        out = torch.empty_like(x)
        out[~at], out[at] = text(x[~at]), image(x[at])
        return out


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("LMConfig.vocab_size must be set (the tokenizer's size) before building")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        block = ModalityLayer if cfg.modality_norms or cfg.modality_ffn else DecoderLayer
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(lambda m: _init_weights(m, cfg.init_std or cfg.hidden_size**-0.5))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.copy_to_image_modules()

    @torch.no_grad()
    def copy_to_image_modules(self, names: list[str] | None = None) -> None:
        """Image modules (all, or the parameters `names`) set to their text twins."""
        params, twins = dict(self.named_parameters()), image_twins(self)
        for name in twins if names is None else names:
            params[name].copy_(params[twins[name]])

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def aux_losses(self) -> tuple[str, ...]:
        """Names of the auxiliary losses its layers add to `Context.aux`."""
        return ("moe_balance",) if self.cfg.moe_experts and self.cfg.moe_balance == "loss" else ()

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layout: Layout | None = None,
        aux: dict | None = None,
        head_at: torch.Tensor | None = None,
        inserted: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        hidden: dict | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) from token ids (B, T) or embeddings (B, T, D); with `head_at` (B, T)
        bool, only those positions' logits (K, vocab): the head costs as much as a layer or more.

        `layout`: packed documents and image tokens (`Layout`; None: plain causal text). Auxiliary
        losses of the layers are added to `aux` when given. `inserted` {layer index: f}: the model's
        own blocks, each run as `x = f(x)` before that layer (Flamingo's gated cross-attention to its
        images). `hidden` {layer index: None}: filled with each of those layers' outputs (B, T, D).
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        ctx = self.context(x, cache, layout or Layout())
        for i, layer in enumerate(self.layers):
            if inserted is not None and i in inserted:
                x = inserted[i](x)
            x = layer(x, ctx, cache)
            if hidden is not None and i in hidden:
                hidden[i] = x
        if aux is not None:
            aux.update(ctx.aux)
        return self.lm_head(self.norm(x if head_at is None else x[head_at]))

    def context(self, x, cache, layout: Layout) -> Context:
        B, T, _ = x.shape
        position_ids, doc_ids, visible = layout.position_ids, layout.doc_ids, layout.visible
        start = cache.seen() if cache is not None else 0
        positions = torch.arange(start, start + T, device=x.device).expand(B, T) if position_ids is None else position_ids
        cos, sin = rope_tables(positions, self.cfg.hidden_size // self.cfg.heads, self.cfg.rope_theta, x.dtype)
        mask = None
        if doc_ids is not None or visible is not None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(B, T, T)
            if visible is not None:
                mask = mask | visible
            if doc_ids is not None:
                mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
            mask = mask[:, None]  # (B, 1, T, T)
        return Context(cos, sin, mask, layout.modality_ids)


def _init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
