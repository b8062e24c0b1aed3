"""The per-patch projectors (LLaVA): one image token per patch, linear or a two-layer MLP.

`cfg` (the ConnectorConfig) is accepted for the connector interface (models/connectors.py) and
not read: these kinds have no settings. `per_patch`: each patch becomes one token on its own (what
Fuyu's raw patches and HF LLaVA's projector need); `activation_width(vision_dim, lm_dim)`: the
activations a token keeps for the backward, in elements (graft/plan.py).
"""

from __future__ import annotations

import torch
from torch import nn


class LinearProjector(nn.Module):
    """One linear map per patch (LLaVA, Liu et al. 2023)."""
    grid = True  # its tokens keep the patches' row-major grid (lm.image_positions=mrope)
    per_patch = True

    @staticmethod
    def activation_width(vision_dim: int, lm_dim: int) -> int:
        return vision_dim  # its input

    def __init__(self, vision_dim: int, lm_dim: int, cfg=None):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class MLPProjector(nn.Module):
    """Linear → GELU → Linear per patch (LLaVA-1.5 `mlp2x_gelu`; HF `LlavaMultiModalProjector`)."""
    grid = True  # its tokens keep the patches' row-major grid (lm.image_positions=mrope)
    per_patch = True

    @staticmethod
    def activation_width(vision_dim: int, lm_dim: int) -> int:
        return vision_dim + 2 * lm_dim  # its input, the hidden layer before and after the GELU

    def __init__(self, vision_dim: int, lm_dim: int, cfg=None):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
