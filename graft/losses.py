"""Training objectives, standalone: each states its maths and its memory cost.

lm_loss: next-token cross-entropy on the positions whose label is not -100 (the answer tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over supervised positions of -log p(labels[t+1] | tokens ≤ t).

    logits (B, T, V), labels (B, T) aligned with the input ids (the shift happens here); labels are
    -100 on prompt, image and padding positions so only answer tokens are learned. Computed in fp32.
    Memory: one (B·T, V) fp32 copy of the logits.  If no position is supervised the loss is 0
    (with a gradient), never NaN.
    """
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    n = (targets != IGNORE).sum()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return total / n.clamp(min=1)
