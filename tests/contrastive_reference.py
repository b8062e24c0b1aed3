"""Textbook implementations of the contrastive losses, written as the papers state them (float64,
explicit sums, no batching tricks), for the tests to compare graft's losses against."""

import math

import torch


def clip_textbook(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP (Radford et al. 2021, Fig. 3): mean of the image→text and text→image cross-entropies."""
    n = x.shape[0]
    i2t = t2i = 0.0
    for i in range(n):
        row = [scale * (x[i] @ y[j]) for j in range(n)]
        col = [scale * (x[j] @ y[i]) for j in range(n)]
        i2t = i2t - (row[i] - torch.logsumexp(torch.stack(row), 0))
        t2i = t2i - (col[i] - torch.logsumexp(torch.stack(col), 0))
    return (i2t / n + t2i / n) / 2


def siglip_textbook(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023, Alg. 1): -1/N Σ_ij log(1 / (1 + exp(-z_ij (t x_i·y_j + b))))."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(1 / (1 + torch.exp(-z * (scale * (x[i] @ y[j]) + bias))))
    return total / n


def inputs(n: int, d: int, seed: int, dtype=torch.float64):
    """Normalised features, a scale and a bias; fixed by the seed (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype) + 0.5 * x, dim=-1)
    scale = torch.tensor(math.exp(1.7), dtype=dtype)
    bias = torch.tensor(-2.3, dtype=dtype)
    return x, y, scale, bias
