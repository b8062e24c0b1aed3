"""Dual encoders for contrastive image–text pretraining: CLIP, SigLIP, CLIPPO, LiT.

    image (B, 3, S, S) → ViT → pool (attention / mean) → image_proj → L2 norm ─┐
                                                                               ├→ clip_loss | siglip_loss
    text ids (B, L)    → TextTower (pooled at <eos> / last) → text_proj → L2 norm ┘

CLIPPO (Tschannen et al. 2023) has one tower: the text is rendered as an image (data/render.py)
and goes through the same ViT, pooling and projection. LiT (Zhai et al. 2022) is `train.freeze`
of the image side (`vision`, optionally `image_head`) with weights from `vision.init_from`.
The learnable temperature starts at log(1/0.07) for CLIP (CLIP §2.5) and log 10 for SigLIP, and
SigLIP's bias at -10 (SigLIP §3.3), so the many negatives do not swamp the first steps.

The image side may be another modality's tower (a series tower, models/series.py: series–text
pairs); its items then come under their modality's batch keys (`series_values`, and `series_counts`
where recordings differ in length: pooling reads each one's own tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.losses import as_local_sum, at_least_fp32, clip_loss, siglip_loss
from graft.models.itm import ImageTextMatching
from graft.models.mim import MaskedImageModel
from graft.models.mlm import MaskedLM
from graft.models.modality import IMAGES, Modality
from graft.models.modality import items as count_items
from graft.models.text_encoder import TextConfig, TextTower
from graft.models.vit import MLP, ViT, VisionConfig

LOSSES = ("clip", "siglip")
IMAGE_POOLS = ("map", "mean")
PARTS = ("vision", "image_head", "text")


@dataclass
class ContrastiveConfig:
    loss: str = "siglip"  # clip | siglip
    embed_dim: int = 128  # the shared embedding both towers project to
    image_pool: str = "map"  # map: attention pooling with a learned probe (SigLIP) | mean over patches
    shared_tower: bool = False  # CLIPPO: text rendered as an image through the one ViT
    chunk_size: int = 0  # >0: compute the loss's logits in blocks of this size (bounded memory)
    init_logit_scale: float | None = None  # log of the temperature multiplier; None: the paper's
    init_logit_bias: float = -10.0  # SigLIP only
    render_font_size: int = 0  # CLIPPO: font height in pixels; 0 = derived from the image size
    # > 0: an image–text matching head with this many fusion layers and hard negatives (ALBEF/BLIP;
    # models/itm.py), trained as the loss `itm` beside `itc`
    itm_layers: int = 0
    # > 0: masked language modelling of the text tower at this rate (BERT: 0.15; models/mlm.py),
    # the loss `mlm`; needs a bidirectional text tower (text.causal=false)
    mlm_prob: float = 0.0
    mlm_on: str = "text"  # text: the text tower alone (BERT); fusion: through the ITM layers with the image (ALBEF)
    # > 0: masked image modelling of the image tower with pixel targets at this patch rate (SimMIM:
    # 0.6; models/mim.py), the loss `mim`; the built-in ViT only
    mim_prob: float = 0.0

    @staticmethod
    def check(cfg: "ContrastiveConfig") -> None:
        for key, value, valid in (("loss", cfg.loss, LOSSES), ("image_pool", cfg.image_pool, IMAGE_POOLS)):
            if value not in valid:
                raise UserError(f"contrastive.{key}={value!r} is not one of {', '.join(valid)}")
        if cfg.embed_dim <= 0 or cfg.chunk_size < 0 or cfg.itm_layers < 0:
            raise UserError("contrastive.embed_dim must be positive, contrastive.chunk_size and .itm_layers non-negative")
        for key in ("mlm_prob", "mim_prob"):
            if not 0 <= getattr(cfg, key) < 1:
                raise UserError(f"contrastive.{key}={getattr(cfg, key)} must be in [0, 1)")
        if cfg.mlm_on not in ("text", "fusion"):
            raise UserError(f"contrastive.mlm_on={cfg.mlm_on!r} is not one of text, fusion")
        if cfg.mlm_on == "fusion" and not (cfg.mlm_prob and cfg.itm_layers):
            raise UserError("contrastive.mlm_on=fusion masks the caption the fusion encoder reads: it needs "
                            f"contrastive.mlm_prob > 0 and contrastive.itm_layers > 0 (now {cfg.mlm_prob}, {cfg.itm_layers})")
        if cfg.mlm_prob and cfg.shared_tower:
            raise UserError("contrastive.mlm_prob: masked language modelling reads the text tower; CLIPPO "
                            "(contrastive.shared_tower=true) has none")
        if cfg.itm_layers and cfg.shared_tower:
            raise UserError("contrastive.itm_layers: image–text matching reads the text tower's states; CLIPPO "
                            "(contrastive.shared_tower=true) has none")


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP) with one learned probe, as HF `SiglipMultiheadAttentionPoolingHead`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.hidden_size) * 0.02)
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P, D) → (B, D); `mask` (B, P), True = an item's own token (None: all)."""
        probe = self.probe.expand(x.shape[0], -1, -1)
        pad = None if mask is None else ~mask
        h = self.attention(probe, x, x, key_padding_mask=pad, need_weights=False)[0]  # (B, 1, D)
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(1)
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class DualEncoder(nn.Module):
    # The loss already averages over the global batch (features are gathered from every rank), so
    # a DDP trainer must undo DDP's gradient averaging: `global_batch_loss` of its design entry.

    def __init__(self, vision: VisionConfig | nn.Module, text: TextConfig, cfg: ContrastiveConfig, eos_id: int,
                 modality: Modality = IMAGES, pad_id: int = 0, special: tuple[int, ...] = ()):
        """`vision`: the built-in ViT's config, or a ready tower of `modality`'s items (a series tower);
        `pad_id`: the text's padding, which image–text matching masks; `special`: token ids masked
        language modelling never chooses (padding, <bos>, <eos>)."""
        super().__init__()
        ContrastiveConfig.check(cfg)
        self.cfg, self.modality = cfg, modality
        self.vision = vision if isinstance(vision, nn.Module) else ViT(vision)
        tower = self.vision.cfg
        self.image_pool = AttentionPool(tower) if cfg.image_pool == "map" else MeanPool()
        self.image_proj = nn.Linear(tower.hidden_size, cfg.embed_dim, bias=False)
        if not cfg.shared_tower:
            self.text = TextTower(text, eos_id)
            self.text_proj = nn.Linear(text.hidden_size, cfg.embed_dim, bias=False)
        default_scale = math.log(1 / 0.07) if cfg.loss == "clip" else math.log(10.0)
        init = default_scale if cfg.init_logit_scale is None else cfg.init_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor([float(init)]))  # shape (1,) as in HF SiglipModel (FSDP2 shards no 0-d tensor)
        if cfg.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor([float(cfg.init_logit_bias)]))
        self.matches = bool(cfg.itm_layers)  # has an image–text matching head: `match`
        if cfg.itm_layers:
            self.itm = ImageTextMatching(text, tower.hidden_size, cfg.itm_layers, eos_id, pad_id)
        if cfg.mlm_prob:
            self.mlm = MaskedLM(text, cfg.mlm_prob, special)
        if cfg.mim_prob:
            self.mim = MaskedImageModel(self.vision, cfg.mim_prob)

    def part_modules(self, part: str) -> list[str]:
        """The submodules (by attribute name) that make up a part of `train.freeze` / `train.init_parts`."""
        groups = {"vision": ["vision"], "image_head": ["image_pool", "image_proj"],
                  "text": ["text", "text_proj"] if not self.cfg.shared_tower else [],
                  "itm": ["itm"] if self.cfg.itm_layers else [], "mlm": ["mlm"] if self.cfg.mlm_prob else [],
                  "mim": ["mim"] if self.cfg.mim_prob else []}
        return groups[part]

    def freeze(self, parts: list[str]) -> None:
        for part in parts:
            for name in self.part_modules(part):
                getattr(self, name).requires_grad_(False)

    def encode_image(self, pixel_values: torch.Tensor | None = None, **items) -> torch.Tensor:
        """(B, 3, S, S) → (B, E), L2-normalised; or another modality's items under its batch keys
        (`series_values` (B, C, L) with `series_counts` (B,))."""
        m = self.modality
        unknown = set(items) - {m.inputs, m.counts}
        if unknown:
            raise TypeError(f"encode_image got {sorted(unknown)}; its items come as pixel_values or {m.inputs}")
        values, counts = items.get(m.inputs, pixel_values), items.get(m.counts)
        if counts is None:
            return F.normalize(self.image_proj(self.image_pool(self.vision(values))), dim=-1)
        h = self.vision(values, counts)  # (B, P, D), each item's first counts[i] tokens its own
        mask = torch.arange(h.shape[1], device=h.device) < counts[:, None]
        return F.normalize(self.image_proj(self.image_pool(h, mask)), dim=-1)

    def match(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Image–text matching (`contrastive.itm_layers`): (B, 3, S, S) images and (B, L) captions,
        row by row → (B,) log P(the caption belongs to the image)."""
        logits = self.itm.logits(self.vision(pixel_values), self.text.states(input_ids), input_ids)
        return F.log_softmax(at_least_fp32(logits), -1)[:, 1]

    def encode_text(self, input_ids: torch.Tensor | None = None, text_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, L), or for CLIPPO rendered text (B, 3, S, S) → (B, E), L2-normalised."""
        if self.cfg.shared_tower:
            return self.encode_image(text_pixels)
        return F.normalize(self.text_proj(self.text(input_ids)), dim=-1)

    @staticmethod
    def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """What zero-shot and retrieval rank by: (n, E) x (m, E) → (n, m) cosines."""
        return image_emb @ text_emb.T

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        distributed = self.training and dist.is_available() and dist.is_initialized()
        world = {"rank": dist.get_rank(), "world_size": dist.get_world_size()} if distributed else {}
        if self.cfg.loss == "clip":
            scale = self.logit_scale.exp().clamp(max=100.0)  # CLIP §2.5: clipped at 100
            return clip_loss(image_emb, text_emb, scale, chunk_size=self.cfg.chunk_size, **world)
        return siglip_loss(image_emb, text_emb, self.logit_scale.exp(), self.logit_bias,
                           chunk_size=self.cfg.chunk_size, **world)

    def forward(self, pixel_values=None, input_ids=None, text_pixels=None, **items):
        """Returns ((image_emb, text_emb), {"itc": the contrastive loss as a local sum over this
        process's pairs, and `itm` / `mlm` / `mim` where configured}) — divided by the pairs of all
        processes `itc` is the global batch's loss. `items`: another modality's batch keys (see
        `encode_image`)."""
        embeddings, losses, _ = self.forward_patches(pixel_values, input_ids, text_pixels, **items)
        return embeddings, losses

    def forward_patches(self, pixel_values=None, input_ids=None, text_pixels=None, **items):
        """`forward`'s (embeddings, losses), and the image tower's patch tokens (B, P, D) when it read
        images (None for another modality's items)."""
        patches = None
        if self.cfg.itm_layers:
            (image_emb, text_emb), losses, patches = self._with_matching(pixel_values, input_ids)
        else:
            if self.modality is IMAGES:
                patches = self.vision(pixel_values)
                image_emb = F.normalize(self.image_proj(self.image_pool(patches)), dim=-1)
            else:
                image_emb = self.encode_image(pixel_values, **items)
            text_emb = self.encode_text(input_ids, text_pixels)
            losses = {"itc": self._itc(image_emb, text_emb)}
        if self.cfg.mlm_prob:
            fuse = (lambda states, ids: self.itm.fuse(patches, states, ids)) if self.cfg.mlm_on == "fusion" else None
            losses["mlm"] = self.mlm.loss(self.text, input_ids, fuse)
        if self.cfg.mim_prob:
            losses["mim"] = self.mim.loss(self.vision, pixel_values)
        return (image_emb, text_emb), losses, patches

    def _itc(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        n = image_emb.shape[0]
        world = dist.get_world_size() if self.training and dist.is_available() and dist.is_initialized() else 1
        return as_local_sum(self.loss(image_emb, text_emb), n, n * world)

    def _with_matching(self, pixel_values, input_ids):
        """`forward` with `itm` beside `itc`: the towers run once, their token states feed both."""
        patches, states = self.vision(pixel_values), self.text.states(input_ids)
        image_emb = F.normalize(self.image_proj(self.image_pool(patches)), dim=-1)
        text_emb = F.normalize(self.text_proj(self.text.pool(states, input_ids)), dim=-1)
        similarity = self.logit_scale.exp().clamp(max=100.0) * self.similarity(image_emb, text_emb)
        itm = self.itm.loss(patches, states, input_ids, similarity.detach())
        return (image_emb, text_emb), {"itc": self._itc(image_emb, text_emb), "itm": itm}, patches

    def loss_counts(self, **batch) -> dict[str, int]:
        """What each loss of `forward` sums over: the image–text (or series–text) pairs; `itm`'s: the
        positives and the two hard negatives of each; `mlm`'s: the chosen tokens; `mim`'s: the masked patches."""
        n = count_items(batch)
        counts = {"itc": n, "itm": 3 * n} if self.cfg.itm_layers else {"itc": n}
        counts |= {"mlm": self.mlm.count(batch["input_ids"])} if self.cfg.mlm_prob else {}
        return counts | ({"mim": self.mim.count(batch["pixel_values"])} if self.cfg.mim_prob else {})
