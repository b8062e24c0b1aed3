"""Where image tokens sit in a decoder's sequence, and whom they may attend to.

A row holds images of `n` tokens each (`modality_ids == IMAGE`, read left to right: tokens 0..n-1 of
the row's image tokens are its first image, n..2n-1 its second, whether or not text separates
them) among text tokens. Two variants of the plain causal, 1-D layout (`lm.image_attention`,
`lm.image_positions`):

- `image_mask`: every token of an image may see every other token of the same image (the
  prefix-LM mask of PaliGemma, Beyer et al. 2024), added to the causal mask;
- `mrope_positions`: token k of an image on a grid of side g, its first token at position p, sits
  at (time, row, column) = (p, p + k // g, p + k % g); text tokens at (p, p, p). `rope_tables`
  turns these into M-RoPE rotations (Qwen2-VL, Wang et al. 2024). Text keeps its 1-D positions,
  so a prompt decodes the same with either variant once the image is in the cache.
"""

from __future__ import annotations

import torch


def _images(images: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, T) image flags: each image token's image number in its row and its index k in
    that image (both -1 on text)."""
    seen = images.long().cumsum(1) - 1  # image tokens before this one, in the row
    number = torch.where(images, seen // n, -1)
    return number, torch.where(images, seen % n, -1)


def image_mask(images: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, T): True where query and key are tokens of the same image (`n` tokens per image)."""
    number, _ = _images(images, n)
    return images[:, :, None] & (number[:, :, None] == number[:, None, :])


def mrope_positions(positions: torch.Tensor, images: torch.Tensor, grid: int | None) -> torch.Tensor:
    """(3, B, T) positions on the (time, row, column) axes from 1-D `positions` (B, T), for
    images of grid x grid tokens."""
    if grid is None:
        raise ValueError("M-RoPE positions need the side of the image token grid")
    _, k = _images(images, grid * grid)
    index = torch.arange(images.shape[1], device=images.device).expand_as(images)
    start = positions.gather(1, (index - k.clamp(min=0)))  # the position of the image's first token
    row = torch.where(images, start + k // grid, positions)
    col = torch.where(images, start + k % grid, positions)
    return torch.stack([torch.where(images, start, positions), row, col])
