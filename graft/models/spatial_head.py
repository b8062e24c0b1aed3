"""A training-only head for the built-in world's spatial questions (`data.spatial_compare`;
docs/spatial.md).

"Is the red circle left of the blue square?" is answered from two positions and the relation word;
the world balances yes and no for every relation, so the answer is an exclusive-or of the relation
and how the two positions compare, and the yes/no loss alone gives gradient descent no slope
towards the comparison: training sits at chance until luck finds it. This head reads the LM's last
layer at the token that predicts a spatial question's answer and is trained to say how the first
named object's column and row compare with the second's (less, equal, greater: two 3-way
classifications), whatever relation was asked. It is never used to answer: generation reads the
LM head only.

`compare_labels` (B, T, 2) holds those two classes at each answer position of a spatial training
question (data/grounding.py `compared_turns`, placed by data/processor.py `compare_targets`) and
IGNORE elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from graft.losses import IGNORE

ORDER = 3  # less, equal, greater


class SpatialHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)  # the residual stream is unnormalised: without it the
        self.proj = nn.Linear(hidden_size, 2 * ORDER)  # head's gradients dwarf the LM's (column, then row)

    def loss_sum(self, hidden: torch.Tensor, compare_labels: torch.Tensor | None) -> torch.Tensor:
        """Σ over the labelled positions of the column and the row cross-entropies; 0 (with a
        gradient, so every process's head takes part in the step) without labels."""
        if compare_labels is None:
            compare_labels = torch.full((*hidden.shape[:2], 2), IGNORE, dtype=torch.long, device=hidden.device)
        at = compare_labels[..., 0] != IGNORE
        logits, target = self.proj(self.norm(hidden[at])).float(), compare_labels[at]
        ce = nn.functional.cross_entropy
        return ce(logits[:, :ORDER], target[:, 0], reduction="sum") + ce(logits[:, ORDER:], target[:, 1], reduction="sum")


def counted(compare_labels: torch.Tensor | None) -> int:
    """How many positions `loss_sum` sums over."""
    return 0 if compare_labels is None else int((compare_labels[..., 0] != IGNORE).sum())
