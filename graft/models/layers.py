"""The small layers several models share: RMSNorm and the SwiGLU feed-forward; and `AfterStep`, the
mark of a module whose state the trainer moves after each optimizer step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in fp32 (Zhang & Sennrich 2019; HF `LlamaRMSNorm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free (Shazeer 2020; HF `Idefics2MLP`)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AfterStep:
    """A module with state that no gradient moves (the MoE's balancing biases, models/moe.py): the
    trainer calls `after_step()` on every such module of the model, on every process, after each
    optimizer step (a skipped step included), and on nothing else."""

    def after_step(self) -> None:
        raise NotImplementedError
