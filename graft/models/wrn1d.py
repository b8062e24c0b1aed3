"""A 1-D wide residual network as a series tower (`series.tower: wrn`): WRN-d-k of Zagoruyko &
Komodakis (2016) with 1-D convolutions, the family the original two-teacher study used on sensor data
(WRN16-3: `series.wrn_depth=16`, `series.wrn_width=3`; WRN28-1: 28 and 1).

    (B, C, L) → normalised per recording and channel (as the patch tower; the statistics token too)
              → conv3 (16 channels) → 3 groups of (d - 4) / 6 pre-activation basic blocks of 16k, 32k,
                64k channels, strides 1, 2, 2 → BN-ReLU → (B, 64k, L / 4)
              → averaged over time into as many tokens as the patch tower has patches (the same
                token count, so every connector and design reads it alike) → (B, P, 64k)

Batch norm keeps running statistics for evaluation (the trainer's `model.eval()`). The convolutions
see past a recording's end, so a WRN tower reads recordings of `series.length` steps only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from graft.models.vit import VisionTower


class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3-BN-ReLU-conv3, plus the input (a 1x1 conv where
    the width or stride changes)."""

    def __init__(self, width_in: int, width: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm1d(width_in), nn.BatchNorm1d(width)
        self.conv1 = nn.Conv1d(width_in, width, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.shortcut = None if width_in == width and stride == 1 else nn.Conv1d(width_in, width, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        return skip + self.conv2(torch.relu(self.bn2(self.conv1(h))))


class WRNTower(VisionTower):
    """A tower as the VLM and the dual encoder ask of one; `cfg` is the series config with the
    network's output width as `hidden_size` (what connectors and pooling read)."""

    def __init__(self, cfg):
        super().__init__()
        n, k = (cfg.wrn_depth - 4) // 6, cfg.wrn_width
        widths = (16 * k, 32 * k, 64 * k)
        self.cfg = dataclasses.replace(cfg, hidden_size=widths[-1])
        self.stem = nn.Conv1d(cfg.channels, 16, 3, padding=1, bias=False)
        blocks, width_in = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                blocks.append(Block(width_in, width, stride if i == 0 else 1))
                width_in = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm1d(widths[-1])
        self.statistics = nn.Linear(2 * cfg.channels, widths[-1]) if cfg.normalise else None
        self.post_layernorm = nn.Identity()  # the last BN-ReLU is the network's own
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, series: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(B, C, L) → (B, P (+ 1 statistics token), 64k)."""
        if layer is not None:
            raise ValueError("a WRN tower gives its last features only (vision.feature_layer has no meaning here)")
        x = series.to(self.stem.weight.dtype)
        stats = None
        if self.statistics is not None:
            mean, std = x.mean(-1, keepdim=True), (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()
            x = (x - mean) / std
            stats = self.statistics(torch.cat([mean, std.log()], 1).transpose(1, 2))  # (B, 1, D)
        h = torch.relu(self.bn(self.blocks(self.stem(x))))  # (B, 64k, L / 4)
        patches = (x.shape[-1] - self.cfg.patch) // self.cfg.stride + 1
        h = nn.functional.adaptive_avg_pool1d(h, patches).transpose(1, 2)  # (B, P, 64k)
        return h if stats is None else torch.cat([stats, h], 1)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        return self.features(series)
