"""Token-compressing connectors: fewer image tokens than patches, from a square patch grid.

- `PixelShuffleProjector` (`connector.kind=pixel_shuffle`, `connector.scale_factor` = r):
  space-to-depth: each r x r block of patch features (D_v each) becomes one feature of r²·D_v,
  so P patches give P / r² tokens, then one bias-free linear map to the LM width. Idefics3
  (Laurençon et al. 2024, "Building and better understanding vision-language models") and
  SmolVLM; the same function as HF `Idefics3Connector` (`pixel_shuffle` + `Idefics3SimpleMLP`),
  whose weight `modality_projection.proj.weight` is our `proj.weight`.
- `AvgPoolProjector` (`connector.kind=avgpool`, `connector.tokens` = N, a square): adaptive
  average pooling of the patch grid to √N x √N, then the 2-layer MLP projector. MM1's simplest
  connector (McKinzie et al. 2024, VL-connector ablation; MM1 follows the pooling with one linear
  layer, here the `mlp` connector's MLP, so that with N = P it is exactly that connector); no HF class.

Both read features as a row-major square grid (a CLS token, if any, already dropped) and emit
tokens in row-major order of the smaller grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError
from graft.models.connector_config import ConnectorConfig
from graft.models.projectors import MLPProjector



def grid_side(num_patches: int, kind: str) -> int:
    """The side of a square patch grid, or a UserError naming the connector kind."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise UserError(f"connector.kind={kind} needs a square patch grid; the tower gives {num_patches} patches")
    return side


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, P, D) → (B, P / r², r²·D): token (i, j) holds patches (r·i + a, r·j + b) in (a, b) order."""
    B, P, D = x.shape
    s = math.isqrt(P) // r
    x = x.view(B, s, r, s, r, D)  # (B, block row i, row in block a, block col j, col in block b, D)
    # HF's view / permute / reshape sequence makes the same (a, b, D) order inside a token.
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, s * s, r * r * D)


def avg_pool(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, P, D) → (B, side², D): adaptive average pooling of the √P x √P grid (bins overlap when
    side does not divide √P, as `nn.AdaptiveAvgPool2d`'s do)."""
    B, P, D = x.shape
    grid = x.transpose(1, 2).reshape(B, D, math.isqrt(P), math.isqrt(P))  # (B, D, H, W)
    return F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)


class PixelShuffleProjector(nn.Module):
    """Space-to-depth by r, then a bias-free linear map (Idefics3; HF `Idefics3Connector`)."""
    grid = True  # its tokens keep the patches' row-major grid (lm.image_positions=mrope)

    def __init__(self, vision_dim: int, lm_dim: int, cfg: ConnectorConfig):
        super().__init__()
        self.r = cfg.scale_factor
        self.proj = nn.Linear(vision_dim * self.r**2, lm_dim, bias=False)

    @staticmethod
    def check(cfg: ConnectorConfig, num_patches: int, lm_dim: int | None = None) -> None:
        side, r = grid_side(num_patches, "pixel_shuffle"), cfg.scale_factor
        if r < 1:
            raise UserError(f"connector.scale_factor={r} must be at least 1")
        if side % r:
            raise UserError(f"connector.scale_factor={r} does not divide the {side}x{side} patch grid")

    def num_tokens(self, num_patches: int) -> int:
        return num_patches // self.r**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.r))


class AvgPoolProjector(nn.Module):
    """Adaptive average pooling of the grid to √N x √N, then Linear → GELU → Linear (MM1)."""
    grid = True  # its tokens keep the patches' row-major grid (lm.image_positions=mrope)

    def __init__(self, vision_dim: int, lm_dim: int, cfg: ConnectorConfig):
        super().__init__()
        self.side = math.isqrt(cfg.tokens)
        self.mlp = MLPProjector(vision_dim, lm_dim)

    @staticmethod
    def check(cfg: ConnectorConfig, num_patches: int, lm_dim: int | None = None) -> None:
        side, n = grid_side(num_patches, "avgpool"), cfg.tokens
        if n < 1 or math.isqrt(n) ** 2 != n:
            raise UserError(f"connector.tokens={n} is not a square number (1, 4, 9, 16, ...)")
        if math.isqrt(n) > side:
            raise UserError(f"connector.tokens={n} needs a {math.isqrt(n)}x{math.isqrt(n)} grid, "
                            f"more than the {side}x{side} patch grid")

    def num_tokens(self, num_patches: int) -> int:
        return self.side**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(avg_pool(x, self.side))
