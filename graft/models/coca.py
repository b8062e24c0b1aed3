"""CoCa (Yu et al. 2022): a dual encoder whose text tower is also the first half of a captioner.

    image (B, 3, S, S) → ViT → patch tokens ─┬→ pool → image_proj → L2 norm ───────────────┐
                                              └→ image_to_text ──────────┐                  ├→ itc
    caption ids (B, L) → TextTower (causal) → token states ─┬→ at <eos> → text_proj → L2 norm ┘
                                                             └→ decoder: causal self-attention,
                                                                cross-attention to the patch tokens,
                                                                MLP (× coca.decoder_layers) → lm_head → caption

The text tower is CoCa's unimodal decoder: causal, so each token's state reads only the tokens
before it, and pooled at <eos> for the contrastive embedding. The multimodal decoder's layers add
cross-attention to the image tokens; its logits at position t predict token t + 1 (`caption`, a
local sum over the caption tokens, counted like a VLM's `lm`). Captions start with <bos> (the
design's processor writes it), which is what generation starts from. Where open_clip's CoCa pools
the image into 255 caption tokens and one contrastive token with attentional poolers, this one
hands the decoder every patch token (9 on the built-in world) and pools as the dual encoder does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.losses import as_local_sum
from graft.models.dual_encoder import DualEncoder
from graft.models.fusion import FusionLayer
from graft.models.text_encoder import TextConfig
from graft.models.vit import _init_weights


@dataclass
class CoCaConfig:
    decoder_layers: int = 2  # multimodal decoder layers (self-attention, cross-attention, MLP)

    @staticmethod
    def check(cfg: CoCaConfig) -> None:
        if cfg.decoder_layers < 1:
            raise UserError(f"coca.decoder_layers={cfg.decoder_layers} must be at least 1")


class CoCa(DualEncoder):
    def __init__(self, vision, text: TextConfig, cfg, eos_id: int, coca: CoCaConfig, bos_id: int, pad_id: int):
        super().__init__(vision, text, cfg, eos_id)
        self.bos_id, self.pad_id, self.max_len = bos_id, pad_id, text.max_len
        self.image_to_text = nn.Linear(self.vision.cfg.hidden_size, text.hidden_size)
        self.decoder = nn.ModuleList(FusionLayer(text, causal=True) for _ in range(coca.decoder_layers))
        self.decoder_norm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        for module in (self.image_to_text, self.decoder, self.decoder_norm, self.lm_head):
            module.apply(_init_weights)

    def part_modules(self, part: str) -> list[str]:
        if part == "decoder":
            return ["image_to_text", "decoder", "decoder_norm", "lm_head"]
        return super().part_modules(part)

    def caption_logits(self, states: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The text tower's token states (B, L, D) and the ViT's patch tokens (B, P, Dv) → (B, L, V)."""
        x, image = states, self.image_to_text(patches)
        for layer in self.decoder:
            x = layer(x, image)
        return self.lm_head(self.decoder_norm(x))

    def forward(self, pixel_values=None, input_ids=None, **unused):
        """((image_emb, text_emb), {"itc": as the dual encoder's, "caption": Σ over caption tokens of
        -log p(token | the tokens before it, the image)})."""
        patches = self.vision(pixel_values)
        image_emb = F.normalize(self.image_proj(self.image_pool(patches)), dim=-1)
        states = self.text.states(input_ids)
        text_emb = F.normalize(self.text_proj(self.text.pool(states, input_ids)), dim=-1)
        logits = self.caption_logits(states, patches)[:, :-1]
        targets = input_ids[:, 1:]
        keep = targets != self.pad_id
        caption = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        n = image_emb.shape[0]
        world = torch.distributed.get_world_size() if self.training and torch.distributed.is_initialized() else 1
        return (image_emb, text_emb), {"itc": as_local_sum(self.loss(image_emb, text_emb), n, n * world),
                                       "caption": caption}

    def loss_counts(self, input_ids, **batch) -> dict[str, int]:
        return {**super().loss_counts(input_ids=input_ids, **batch), "caption": int((input_ids[:, 1:] != self.pad_id).sum())}

    @torch.no_grad()
    def caption(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy captions from <bos>, up to <eos> (not included) or `max_new_tokens` (at most the
        text tower's max_len - 1): new ids per image."""
        steps = min(max_new_tokens or self.max_len, self.max_len - 1)
        patches = self.vision(pixel_values)
        ids = torch.full((pixel_values.shape[0], 1), self.bos_id, dtype=torch.long, device=pixel_values.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(steps):
            nxt = self.caption_logits(self.text.states(ids), patches)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.text.eos_id), nxt)
            ids, done = torch.cat([ids, nxt[:, None]], 1), done | (nxt == self.text.eos_id)
            if done.all():
                break
        eos = self.text.eos_id
        return [row[: row.index(eos)] if eos in row else row for row in ids[:, 1:].tolist()]
