"""Where image tokens sit in a decoder's sequence, and whom they may attend to.

A sequence holds runs of image tokens (one run per image, `modality_ids == 1`) among text tokens.
Two variants of the plain causal, 1-D layout (`lm.image_attention`, `lm.image_positions`):

- `image_mask`: every token of an image may see every other token of the same image (the
  prefix-LM mask of PaliGemma, Beyer et al. 2024), added to the causal mask;
- `mrope_positions`: image token k of a grid of side g starting at position p sits at
  (time, row, column) = (p, p + k // g, p + k % g); text tokens at (p, p, p). `rope_tables` turns
  these into M-RoPE rotations (Qwen2-VL, Wang et al. 2024). Text keeps its 1-D positions, so a
  prompt decodes the same with either variant once the image is in the cache.
"""

from __future__ import annotations

import torch


def _runs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, T) image flags: each token's run number (0 before the first image) and the index
    of the first token of the image run it belongs to."""
    before = torch.zeros_like(images[:, :1])
    starts = images & ~torch.cat([before, images[:, :-1]], dim=1)  # first token of each image
    index = torch.arange(images.shape[1], device=images.device).expand_as(images)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return starts.long().cumsum(1), first


def image_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, T, T): True where query and key are tokens of the same image."""
    run, _ = _runs(images)
    both = images[:, :, None] & images[:, None, :]
    return both & (run[:, :, None] == run[:, None, :])


def mrope_positions(positions: torch.Tensor, images: torch.Tensor, grid: int | None) -> torch.Tensor:
    """(3, B, T) positions on the (time, row, column) axes from 1-D `positions` (B, T)."""
    if grid is None:
        raise ValueError("M-RoPE positions need the side of the image token grid")
    _, first = _runs(images)
    k = torch.arange(images.shape[1], device=images.device) - first  # index inside the image
    start = positions.gather(1, first)
    row = torch.where(images, start + k // grid, positions)
    col = torch.where(images, start + k % grid, positions)
    return torch.stack([torch.where(images, start, positions), row, col])
