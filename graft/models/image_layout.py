"""Where a prefix-fusion model's item tokens sit in the decoder's sequence, and whom they may attend to.

The decoder itself knows only positions (on one rotary axis, or three) and a mask of extra pairs
that may attend (models/decoder.py `Layout`); the model that lays its rows out (VLM.lm_inputs)
composes these from its settings `lm.image_attention` and `lm.image_positions`:

- `item_mask` (`bidirectional`): every token of an item may see every other token of the same item
  (the prefix-LM mask of PaliGemma, Beyer et al. 2024), added to the causal mask;
- `CellEmbedding` (`lm.image_cells`): a learned row and column vector added to each image token
  before the decoder, so that a token's cell is in what attention reads from it, as a word's
  identity is (rotary positions only shape where attention looks);
- `mrope_positions` (`mrope`): token k of an image on a grid of side g, its first token at position
  p, sits at (time, row, column) = (p, p + k // g, p + k % g); text tokens at (p, p, p).
  `rope_tables` turns these into M-RoPE rotations (Qwen2-VL, Wang et al. 2024). Text keeps its 1-D
  positions, so a prompt decodes the same with either variant once the image is in the cache.

Items are read from the placeholder flags `slots` (B, T), left to right, top to bottom: the first
`counts[0]` flagged tokens are item 0, the next `counts[1]` item 1, and so on, whether or not text
separates them. `counts` is the per-item token count (n,), or one int when every item has as many.
"""

from __future__ import annotations

import torch
from torch import nn


def item_numbers(slots: torch.Tensor, counts: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, T) placeholder flags: each item token's item number in the batch and its index k in
    that item (both -1 on text). No host sync: usable inside a compiled graph."""
    seen = slots.reshape(-1).long().cumsum(0) - 1  # item tokens before this one, in the batch
    if isinstance(counts, int):
        number, k = seen // counts, seen % counts
    elif counts.numel() == 0:
        number = k = torch.zeros_like(seen)
    else:
        ends = counts.cumsum(0)
        number = torch.searchsorted(ends, seen, right=True).clamp(max=counts.numel() - 1)
        k = seen - (ends - counts)[number]
    flat = slots.reshape(-1)
    return (torch.where(flat, number, -1).view_as(slots), torch.where(flat, k, -1).view_as(slots))


def item_mask(slots: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """(B, T, T): True where query and key are tokens of the same item."""
    number, _ = item_numbers(slots, counts)
    return slots[:, :, None] & (number[:, :, None] == number[:, None, :])


def mrope_positions(positions: torch.Tensor, slots: torch.Tensor, grid: int | None) -> torch.Tensor:
    """(3, B, T) positions on the (time, row, column) axes from 1-D `positions` (B, T), for
    images of grid x grid tokens."""
    if grid is None:
        raise ValueError("M-RoPE positions need the side of the image token grid")
    _, k = item_numbers(slots, grid * grid)
    index = torch.arange(slots.shape[1], device=slots.device).expand_as(slots)
    start = positions.gather(1, (index - k.clamp(min=0)))  # the position of the image's first token
    row = torch.where(slots, start + k // grid, positions)
    col = torch.where(slots, start + k % grid, positions)
    return torch.stack([torch.where(slots, start, positions), row, col])


class CellEmbedding(nn.Module):
    """Token k of a `grid` x `grid` image gets row vector k // grid and column vector k % grid added
    (the built-in world's cells; a table per axis, so tokens in one column share a vector)."""

    def __init__(self, grid: int, dim: int, std: float):
        super().__init__()
        self.row, self.col = nn.Embedding(grid, dim), nn.Embedding(grid, dim)
        for table in (self.row, self.col):
            nn.init.normal_(table.weight, std=std)
        k = torch.arange(grid * grid)
        self.register_buffer("rows", k // grid, persistent=False)
        self.register_buffer("cols", k % grid, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, grid², D) image tokens with their cells added."""
        return tokens + (self.row(self.rows) + self.col(self.cols)).to(tokens.dtype)
