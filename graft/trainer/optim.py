"""AdamW with weight-decay groups, and the learning-rate schedules: linear warmup, then cosine to a
floor at the last step, or warmup-stable-decay (WSD: constant, then a linear decay over the last
`decay_fraction` of the steps, Hägele et al. 2024). A WSD run of T steps and the first steps of a
longer one agree until T's decay starts (`wsd_decay_start`): a checkpoint there, resumed with
train.steps = T, continues as the shorter run would have (graft scale sweep --schedule wsd)."""

from __future__ import annotations

import math

import torch

from graft.config import OptimConfig
from graft.errors import UserError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and conv weights, embeddings); never norms, biases or 1-D tensors."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise UserError("nothing to train: train.freeze freezes every part")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=cfg.fused or None)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr at `step`: linear warmup from ~0, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    if cfg.schedule == "wsd":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: wsd_factor(s, total_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )


def wsd_decay_start(total: int, warmup: int, fraction: float) -> int:
    """The step at which a WSD run of `total` steps starts to decay (never inside the warmup)."""
    return max(warmup, total - math.ceil(fraction * total))


def wsd_factor(step: int, total: int, warmup: int, min_ratio: float, fraction: float) -> float:
    """Multiplier of the base lr at `step` under WSD: linear warmup from ~0, 1 until the decay
    starts (where it is still 1), then linear to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    start = wsd_decay_start(total, warmup, fraction)
    if step <= start:
        return 1.0
    return 1 - (1 - min_ratio) * min(1.0, (step - start) / max(1, total - start))
