"""A training-only head that asks each image token what its grid cell holds (`data.cell_targets`;
data/cells.py says why, docs/spatial.md what it changed).

It reads the LM's input at the image placeholders (the image tokens as the decoder receives them)
and classifies the cell's shape, colour and size (class 0: an empty cell), row and column: linear
maps of the token, so what it rewards is a token from which each attribute can be read linearly,
as an attention key is. It is never used to answer.

`cell_labels` (B, T, 5) holds the classes at each placeholder of a training image and IGNORE
elsewhere (placed by data/processor.py `text_row`, batched by `head_labels`).
"""

from __future__ import annotations

import torch
from torch import nn

from graft.losses import IGNORE


class CellHead(nn.Module):
    def __init__(self, hidden_size: int, classes: tuple[int, ...]):
        super().__init__()
        self.classes = classes  # per attribute (data/cells.py `classes`)
        self.proj = nn.Linear(hidden_size, sum(classes))  # every attribute's logits side by side

    def loss_sum(self, inputs_embeds: torch.Tensor, cell_labels: torch.Tensor | None) -> torch.Tensor:
        """Σ over the labelled positions of the mean of the attributes' cross-entropies; 0 (with a
        gradient, so every process's head takes part in the step) without labels."""
        if cell_labels is None:
            cell_labels = torch.full((*inputs_embeds.shape[:2], len(self.classes)), IGNORE, dtype=torch.long,
                                     device=inputs_embeds.device)
        at = cell_labels[..., 0] != IGNORE
        logits, target = self.proj(inputs_embeds[at]).float(), cell_labels[at]
        parts = logits.split(self.classes, dim=-1)
        ce = nn.functional.cross_entropy
        return sum(ce(part, target[:, k], reduction="sum") for k, part in enumerate(parts)) / len(self.classes)


def counted(cell_labels: torch.Tensor | None) -> int:
    """How many positions `loss_sum` sums over."""
    return 0 if cell_labels is None else int((cell_labels[..., 0] != IGNORE).sum())
