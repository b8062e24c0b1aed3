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
"""

from __future__ import annotations

import torch
from torch import nn

from graft.models.vit import VisionConfig

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
