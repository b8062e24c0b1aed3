"""Connectors: map vision features (B, P, D_vision) to LM-space tokens (B, N, D_lm).

To add one: write an `nn.Module` with that signature and a `num_tokens(num_patches)` rule, add
its name to `CONNECTORS` below. The VLM asks the connector how many image tokens it makes, and
the processor writes that many placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import UserError


@dataclass
class ConnectorConfig:
    kind: str = "mlp"  # linear | mlp

    @staticmethod
    def check(cfg: "ConnectorConfig") -> None:
        if cfg.kind not in CONNECTORS:
            raise UserError(f"connector.kind={cfg.kind!r} is not one of {', '.join(CONNECTORS)}")


class LinearProjector(nn.Module):
    """One linear map per patch (LLaVA, Liu et al. 2023)."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class MLPProjector(nn.Module):
    """Linear → GELU → Linear per patch (LLaVA-1.5 `mlp2x_gelu`; HF `LlavaMultiModalProjector`)."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


CONNECTORS = {"linear": LinearProjector, "mlp": MLPProjector}


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int) -> nn.Module:
    ConnectorConfig.check(cfg)
    return CONNECTORS[cfg.kind](vision_dim, lm_dim)  # PyTorch's default (fan-in scaled) init
