"""Approach 2 of Hoffmann et al. (2022, §3.2): isoFLOP profiles.

At each training budget C several model sizes are trained to exactly C. A parabola in log N through
each profile's losses, L(C, N) = p2 (log N)^2 + p1 log N + p0, has its minimum at
N_opt(C) = exp(-p1 / 2 p2); the data D_opt(C) is read off the profile at that size (log D is
fitted as a line in log N within the profile: one budget, so D ∝ 1 / FLOPs-per-token(N)). Then
N_opt ∝ C^a and D_opt ∝ C^b are lines in log-log through the minima. The uncertainty is a
bootstrap over each profile's points (resampled with replacement within the profile).

A profile whose parabola opens downwards (p2 ≤ 0) has no minimum, and a minimum outside the sizes
trained is an extrapolation (the ladder did not bracket the optimum at that budget): both are
reported as such and left out of the exponents, which need two bracketed minima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Profile:
    flops: float
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    parabola: tuple[float, float, float]  # p2, p1, p0 in log N
    n_opt: float  # nan without a minimum
    d_opt: float
    loss_opt: float
    bracketed: bool  # the minimum lies within the sizes trained

    @property
    def has_minimum(self) -> bool:
        return math.isfinite(self.n_opt)


def profile(flops: float, params, tokens, loss) -> Profile:
    params, tokens, loss = (np.asarray(v, float) for v in (params, tokens, loss))
    x = np.log(params)
    p2, p1, p0 = np.polyfit(x, loss, 2)
    if p2 <= 0:
        return Profile(flops, params, tokens, loss, (p2, p1, p0), math.nan, math.nan, math.nan, False)
    x_opt = -p1 / (2 * p2)
    slope, icept = np.polyfit(x, np.log(tokens), 1)
    return Profile(flops, params, tokens, loss, (p2, p1, p0), math.exp(x_opt), math.exp(slope * x_opt + icept),
                   float(p2 * x_opt**2 + p1 * x_opt + p0), bool(x.min() <= x_opt <= x.max()))


def profiles(flops, params, tokens, loss) -> list[Profile]:
    """One profile per budget with at least three sizes."""
    flops, params, tokens, loss = (np.asarray(v, float) for v in (flops, params, tokens, loss))
    out = []
    for c in np.unique(flops):
        at = flops == c
        if len(np.unique(params[at])) >= 3:
            out.append(profile(float(c), params[at], tokens[at], loss[at]))
    return out


def exponents(found: list[Profile]) -> dict | None:
    """N_opt = kN C^a and D_opt = kD C^b through the profiles' bracketed minima (None under two)."""
    good = [p for p in found if p.bracketed]
    if len(good) < 2:
        return None
    c = np.log([p.flops for p in good])
    a, log_kn = np.polyfit(c, np.log([p.n_opt for p in good]), 1)
    b, log_kd = np.polyfit(c, np.log([p.d_opt for p in good]), 1)
    return {"a": float(a), "b": float(b), "kN": math.exp(log_kn), "kD": math.exp(log_kd), "budgets": len(good)}


def bootstrap(found: list[Profile], samples: int = 200, seed: int = 0) -> list[dict]:
    """`exponents` of profiles refitted on resamples of their own points (fits without two minima dropped)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        redrawn = []
        for p in found:
            i = rng.integers(0, len(p.loss), len(p.loss))
            if len(np.unique(p.params[i])) >= 3:
                redrawn.append(profile(p.flops, p.params[i], p.tokens[i], p.loss[i]))
        fit = exponents(redrawn)
        if fit is not None:
            out.append(fit)
    return out


def n_opt_at(fit: dict, flops) -> np.ndarray:
    return fit["kN"] * np.asarray(flops, float) ** fit["a"]
