"""`Context`: what one forward call of the decoder gives every layer (models/decoder.py builds it;
the MoE layers of models/moe.py read it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """What one forward call gives every layer; built per call, never kept on a module.

    cos, sin: rotary tables (B, T, head_dim). mask: (B, 1, T, T), True = may attend, or None for
    plain causal attention. modality_ids: (B, T), TEXT or IMAGE (models/modality.py), or None (text only). aux:
    auxiliary losses a layer adds by name, as local sums over the batch's positions (the caller
    returns them beside its own; none of graft's built-in layers adds one yet)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
