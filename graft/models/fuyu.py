"""Fuyu: no vision encoder; raw image patches go through one linear map straight into the LM.

`model: fuyu` (Bavishi et al. 2023, "Fuyu-8B: A Multimodal Architecture for AI Agents", Adept;
the encoder-free design Shukor et al. 2025 call early fusion). The image is cut into
`vision.patch_size` squares, each flattened (row, column, channel, as Fuyu's image processor
does) and projected to the LM's width by the connector (`connector.kind=linear`, Fuyu's
`vision_embed_tokens`; `mlp` also works); the LM reads the patches row by row, each row of
patches followed by a newline token (the tokenizer's "\n"), which is how Fuyu tells the LM the
image's width. The whole model is then the prefix VLM (models/vlm.py) with `Patches` as its
"tower": the same splice, loss, packing, generation and checkpoints. The LM is the built-in
decoder, so the model equals HF `FuyuForCausalLM` with a Llama text config and the same weights
(tests/test_fuyu.py). Of `vision.*` only image_size, patch_size, image_mean and image_std apply.

`eve.teacher` adds EVE's alignment (`AlignedFuyu`, and its teacher and loss in designs/fuyu.py):
what a vision encoder would have given, taught to the LM instead of put in front of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graft.errors import UserError
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM

# The vision.* keys an encoder-free model reads; the others would have no effect.
READS = ("image_size", "patch_size", "image_mean", "image_std")


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H/p · W/p, p · p · C): patches in row-major order, each flattened as
    (row, column, channel) (HF `FuyuImageProcessor.patchify_image`)."""
    B, C, H, W = pixels.shape
    x = pixels.view(B, C, H // patch, patch, W // patch, patch)  # (B, C, rows, p, cols, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


class Patches(nn.Module):
    """The encoder-free stand-in for a vision tower: `features` are the raw flattened patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch, self.side = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.embed_dim, self.num_patches = 3 * cfg.patch_size**2, self.side**2
        self.post_layernorm = nn.Identity()  # nothing after the last layer: there are no layers

    def features(self, pixels: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return patchify(pixels, self.patch)


@dataclass
class EveConfig:
    """EVE's alignment (Diao et al. 2024, "Unveiling Encoder-Free Vision-Language Models"): the
    LM's hidden states at the patch positions, through a linear head, are pulled toward a frozen
    vision teacher's features of the same patches (cosine distance), as the named loss `align`."""
    teacher: str | None = None  # a graft run with a ViT, or a local HF SigLIP/CLIP folder; None = off
    layer: int = -1  # the LM layer whose output is aligned (negative: from the last)

    @staticmethod
    def check(cfg: EveConfig, lm_layers: int) -> None:
        if cfg.teacher is not None and not Path(cfg.teacher).is_dir():
            raise UserError(f"eve.teacher={cfg.teacher} is not a directory (a graft run or an HF vision folder)")
        if not -lm_layers <= cfg.layer < lm_layers:
            raise UserError(f"eve.layer={cfg.layer} is not a layer of the {lm_layers}-layer LM")


class AlignedFuyu(VLM):
    """Fuyu (`Patches` into the LM) whose LM also says, through a linear head, what a vision
    teacher sees at each patch. In training its outputs are `{"aligned": (image tokens, D_teacher)}`:
    the head on layer `layer`'s states at the image tokens. The frozen teacher and the loss are the
    trainer's (designs/fuyu.py, graft/objectives.py): this model holds no teacher."""

    def __init__(self, vision: VisionConfig, connector, lm, image_token_id: int, teacher_dim: int, layer: int):
        super().__init__(Patches(vision), connector, lm, image_token_id)
        self.align_head = nn.Linear(self.lm.hidden_size, teacher_dim)
        self.align_layer = layer % len(self.lm.layers)

    def forward(self, input_ids, pixel_values=None, labels=None, cache=None, image_tokens=None, **rows):
        if labels is None:
            return super().forward(input_ids, pixel_values, labels, cache, image_tokens, **rows)
        hidden = {self.align_layer: None}
        _, losses = super().forward(input_ids, pixel_values, labels, cache, image_tokens, hidden=hidden, **rows)
        return {"aligned": self.align_head(hidden[self.align_layer][input_ids == self.image_token_id])}, losses
