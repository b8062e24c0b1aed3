"""The Perceiver Resampler connector: N learned latents read the patches, N image tokens come out.

`connector.kind=resampler` (`connector.latents` = N, `connector.layers`, `connector.heads`).
Flamingo's Perceiver Resampler (Alayrac et al. 2022, "Flamingo: a Visual Language Model for
Few-Shot Learning", §2.1 and Fig. 5) in Idefics2's form (Laurençon et al. 2024, "What matters when
building vision-language models?"): the patch features are first projected to the LM width by a
SwiGLU MLP, then N learned latent queries attend, in each of `layers` layers, to the concatenation
[patches; latents] (keys and values from both, so latents also see each other), followed by a
SwiGLU MLP, pre-RMSNorm with residuals, and a final RMSNorm. The output is N tokens whatever the
number of patches P.

The same function as Hugging Face `Idefics2Connector` (`transformers.models.idefics2`: its
`modality_projection`, an `Idefics2MLP`, then `Idefics2PerceiverResampler`), with these settings:
`resampler_n_latents` = N, `resampler_depth` = layers, `resampler_n_heads` = `num_key_value_heads`
= heads, `resampler_head_dim` = LM width / heads (heads must divide the width), hidden_act silu,
rms_norm_eps 1e-6 (`Idefics2PerceiverConfig`'s default), and the modality projection's hidden size
4 x LM width (Idefics2 takes the LM's `intermediate_size`, which a connector does not see; 4 x is
the rule of the resampler's own MLP). The parameter names are HF's, so the keys of this module's
state dict are those of `Idefics2Connector` (`model.connector.` in `Idefics2Model`).

Cost per image, d = LM width: the projection and the key/value maps run over all P patches,
O(P·d_v·d + layers·P·d²); attention scores are O(N·(P + N)·d) per layer (latent queries only,
never the (P + N)² of self-attention over the patches); the latent MLPs O(layers·N·d²). The LM
then reads N tokens: its cost is flat in P.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.models.connector_config import ConnectorConfig
from graft.models.layers import RMSNorm, SwiGLU


EPS = 1e-6  # Idefics2PerceiverConfig.rms_norm_eps
MAX_LATENTS_PER_PATCH = 4  # more latents than 4 x the patches is no longer compression


class PerceiverAttention(nn.Module):
    """Latent queries; keys and values from [context; latents] (HF `Idefics2PerceiverAttention`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, _ = latents.shape
        kv = torch.cat([context, latents], dim=1)  # (B, P + N, d): context first, as in HF
        q = self.q_proj(latents).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_proj(kv).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, H, P + N, hd)
        v = self.v_proj(kv).view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch is real; (B, H, N, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))


class PerceiverLayer(nn.Module):
    """Pre-norm cross-attention and MLP on the latents (HF `Idefics2PerceiverLayer`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.input_latents_norm = RMSNorm(dim, EPS)
        self.input_context_norm = RMSNorm(dim, EPS)
        self.self_attn = PerceiverAttention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim, EPS)
        self.mlp = SwiGLU(dim, 4 * dim, dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context))
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """(B, P, d) → (B, N, d): `layers` PerceiverLayers over N learned latents, then an RMSNorm
    (HF `Idefics2PerceiverResampler`). Every layer reads the same context (the projected patches)."""

    def __init__(self, dim: int, latents: int, layers: int, heads: int):
        super().__init__()
        # N(0, 1) as IDEFICS (v1) and Flamingo implementations start them, not Idefics2's all-ones:
        # identical latents would start as N copies of one token.
        self.latents = nn.Parameter(torch.randn(latents, dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim, EPS)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.latents.expand(context.shape[0], -1, -1)  # (B, N, d)
        for layer in self.layers:
            x = layer(x, context)
        return self.norm(x)


class ResamplerConnector(nn.Module):
    """Project patches to the LM width (SwiGLU), then resample them to N latents (HF `Idefics2Connector`)."""
    grid = False  # its tokens are learned queries, not places in the image

    def __init__(self, vision_dim: int, lm_dim: int, cfg: ConnectorConfig):
        super().__init__()
        self.check(cfg, lm_dim=lm_dim)
        self.modality_projection = SwiGLU(vision_dim, 4 * lm_dim, lm_dim)
        self.perceiver_resampler = PerceiverResampler(lm_dim, cfg.latents, cfg.layers, cfg.heads)

    @staticmethod
    def check(cfg: ConnectorConfig, num_patches: int | None = None, lm_dim: int | None = None) -> None:
        """Settings in range; the patch count and LM width are checked when given."""
        if cfg.layers < 1:
            raise UserError(f"connector.layers={cfg.layers} must be at least 1")
        if cfg.heads < 1:
            raise UserError(f"connector.heads={cfg.heads} must be at least 1")
        if cfg.latents < 1:
            raise UserError(f"connector.latents={cfg.latents} must be at least 1")
        if num_patches is not None and cfg.latents > MAX_LATENTS_PER_PATCH * num_patches:
            raise UserError(f"connector.latents={cfg.latents} is more than {MAX_LATENTS_PER_PATCH} x the "
                            f"{num_patches} patches of the vision tower: a resampler should compress")
        if lm_dim is not None and lm_dim % cfg.heads:
            raise UserError(f"connector.heads={cfg.heads} does not divide the LM width {lm_dim} "
                            "(the resampler runs at the LM width; head dim = width / heads)")

    def num_tokens(self, num_patches: int) -> int:
        return self.perceiver_resampler.latents.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(x))  # (B, P, D_v) → (B, P, d) → (B, N, d)
