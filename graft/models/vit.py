"""Vision Transformer, architecturally identical to Hugging Face `SiglipVisionModel` (no pooling head).

Module names match the HF class, so weights map one-to-one (see `models/hf.py`):
patch embedding (Conv2d, stride = patch) + learned position table → pre-LN encoder layers
(LayerNorm → MHA with biases → residual; LayerNorm → fc1 → GELU(tanh) → fc2 → residual) →
post LayerNorm.  SigLIP, Zhai et al. 2023; ViT, Dosovitskiy et al. 2021.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    intermediate_size: int = 512
    layer_norm_eps: float = 1e-6
    # Which encoder layer feeds a VLM connector: -1 = the last (before post_layernorm), as
    # HF LLaVA's `vision_feature_layer` counts.
    feature_layer: int = -1
    # A run directory (VLM or contrastive) whose latest checkpoint supplies this tower's weights
    # and architecture, e.g. a finished `siglip` run for a LLaVA-style VLM (see rundir.py).
    init_from: str | None = None
    # A local Hugging Face SiglipVisionModel / CLIPVisionModel folder to use instead of the built-in
    # ViT; its architecture fields (and image mean/std, if it has a preprocessor_config.json) are
    # read from the folder and written into config.yaml (models/hf_backbones.py).
    hf_path: str | None = None
    # Std of the learned position table at init (HF SigLIP: 0.02). At 0.02 the table stays near its
    # init while the patches' content grows ~100x; 0.2 keeps each patch's column readable from its
    # token (docs/spatial.md). Built-in tower trained from scratch only.
    position_init_std: float = 0.02
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # SigLIP: pixels in [-1, 1]
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @staticmethod
    def check(cfg: "VisionConfig") -> None:
        if cfg.position_init_std != 0.02 and (cfg.hf_path or cfg.init_from):
            key = "vision.hf_path" if cfg.hf_path else "vision.init_from"
            raise UserError(f"vision.position_init_std={cfg.position_init_std} has no effect: the tower's weights come from {key}")
        if cfg.position_init_std <= 0:
            raise UserError(f"vision.position_init_std={cfg.position_init_std} must be positive")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, replace: tuple | None = None) -> torch.Tensor:
        """`replace`: (where (B, P) bool, vector (D,)): those patches' content is the vector (masked
        image modelling's mask token); their positions stay."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order
        if replace is not None:
            where, vector = replace
            x = torch.where(where[..., None], vector.to(x.dtype), x)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, 1, 1, T), True = a key that may be attended (a shorter series' own tokens)."""
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, D/H); bidirectional for images
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal, mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class VisionTower(nn.Module):
    """What a VLM needs from a vision tower (ViT here, HFVisionTower in hf_backbones.py): `cfg`
    (a VisionConfig), `features(pixels, layer) -> (B, P, D)`, and these two numbers."""

    cfg: VisionConfig

    @property
    def embed_dim(self) -> int:
        return self.cfg.hidden_size

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches


class ViT(VisionTower):
    """`forward` gives HF's `last_hidden_state`; `features` gives one layer's output for a VLM."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PatchEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(_init_weights)
        if cfg.position_init_std != 0.02:  # re-drawn; at the default a seed gives the weights it always did
            nn.init.normal_(self.embeddings.position_embedding.weight, std=cfg.position_init_std)

    def features(self, pixel_values: torch.Tensor, layer: int | None = None, replace: tuple | None = None) -> torch.Tensor:
        """Output of encoder layer `layer` (negative counts from the end), no post norm: (B, P, D);
        `replace`: patches read as a vector instead (see PatchEmbeddings)."""
        layer = self.cfg.feature_layer if layer is None else layer
        stop = layer % len(self.encoder.layers) + 1
        x = self.embeddings(pixel_values, replace)
        for block in self.encoder.layers[:stop]:
            x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.features(pixel_values, layer=-1))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
