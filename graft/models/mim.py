"""Masked image modelling for a dual encoder's image tower with pixel targets (SimMIM, Xie et al.
2022; MAE's per-patch targets, He et al. 2022): `contrastive.mim_prob` > 0 (SimMIM: 0.6).

Each patch is masked with probability `prob` (at least one per image): its content embedding is
replaced by a learned mask vector, its position kept, and the ViT reads the whole grid. A linear
head on the last layer's (post-normed) output at each masked patch predicts that patch's pixels
(as the model reads them: normalised, channels x patch x patch); `mim` is the L1 distance summed
over masked patches (each patch's mean over its values), counted over masked patches. The mask
is drawn from a generator seeded by the batch's pixels, so it is a pure function of the batch (as
`models/mlm.py`'s choice is).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from graft.models.vit import ViT


def patch_mask(pixel_values: torch.Tensor, grid: int, prob: float) -> torch.Tensor:
    """(B, grid²) bool: each patch masked with probability `prob`, at least one per image, drawn from
    a generator seeded by the pixels (a pure function of the batch)."""
    B = pixel_values.shape[0]
    gen = torch.Generator().manual_seed(zlib.crc32(pixel_values.detach().float().cpu().numpy().tobytes()))
    u = torch.rand(B, grid**2, generator=gen)
    masked = u < prob
    masked[torch.arange(B), u.argmin(1)] = True
    return masked.to(pixel_values.device)


class PatchMasker(nn.Module):
    """A tower's patches masked with probability `prob` and read as a learned mask vector instead."""

    def __init__(self, tower: ViT, prob: float):
        super().__init__()
        c = tower.cfg
        self.prob, self.patch, self.grid = prob, c.patch_size, c.image_size // c.patch_size
        self.mask_embedding = nn.Parameter(torch.randn(c.hidden_size) * 0.02)

    def mask(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P) bool: the masked patches, at least one per image."""
        return patch_mask(pixel_values, self.grid, self.prob)

    def states(self, tower: ViT, pixel_values: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The tower's last (post-normed) states (B, P, D) with the `masked` patches replaced."""
        return tower.post_layernorm(tower.features(pixel_values, -1, (masked, self.mask_embedding)))


class MaskedImageModel(PatchMasker):
    def __init__(self, tower: ViT, prob: float):
        super().__init__(tower, prob)
        self.head = nn.Linear(tower.cfg.hidden_size, 3 * tower.cfg.patch_size**2)

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, P, 3·p·p), patches in the ViT's row-major order."""
        B, p = pixel_values.shape[0], self.patch
        x = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (B, 3, g, g, p, p)
        return x.permute(0, 2, 3, 1, 4, 5).reshape(B, self.grid**2, 3 * p * p)

    def count(self, pixel_values: torch.Tensor) -> int:
        return int(self.mask(pixel_values).sum())

    def loss(self, tower: ViT, pixel_values: torch.Tensor) -> torch.Tensor:
        """Σ over masked patches of the mean |predicted - true| pixel value."""
        masked = self.mask(pixel_values)
        predicted = self.head(self.states(tower, pixel_values, masked)[masked]).float()
        return F.l1_loss(predicted, self.patches(pixel_values)[masked].float(), reduction="none").mean(-1).sum()
