"""Scaling laws: L(N, D) = E + A / N^alpha + B / D^beta fitted to (parameters, tokens, loss) points.

The fit is Hoffmann et al.'s approach 3 (2022, §3.3) done as Besiroglu et al. (2024) showed it must
be: minimise the SUM over points of Huber_delta(log L_hat - log L), delta = 1e-3, with

    log L_hat = logsumexp(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,

by L-BFGS (scipy's L-BFGS-B, exact gradients) to tight tolerances, from the best starts of
Hoffmann's grid of initialisations. Averaging instead of summing, or scipy's default tolerances,
stops the optimiser early, at constants close to those Hoffmann et al. published (E ≈ 1.69): the
trap is kept runnable (`reduction="mean"`, `tight=False`) and tested.

Uncertainty is a bootstrap over points (resampled with replacement, each refitted from the full
fit): standard errors and 95 % intervals of every constant and of the compute-optimal frontier,
N_opt(C) = G (C/6)^(beta/(alpha+beta)), D_opt(C) = (C/6)^(alpha/(alpha+beta)) / G with
G = (alpha A / (beta B))^(1/(alpha+beta)), which minimises L under C = 6 N D.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from graft.errors import UserError

DELTA = 1e-3  # Huber's delta on log-loss residuals (Hoffmann et al.)
NAMES = ("E", "A", "B", "alpha", "beta")
# Hoffmann et al.'s grid of initialisations over (e, a, b, alpha, beta)
GRID = (np.arange(-1.0, 1.5, 0.5), np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0),
        np.arange(0.0, 2.5, 0.5), np.arange(0.0, 2.5, 0.5))
STARTS = 32  # L-BFGS runs from the best grid points (the grid's 4,500 objectives are computed exactly)


@dataclass
class Points:
    params: np.ndarray  # N
    tokens: np.ndarray  # D
    loss: np.ndarray  # L

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, index: np.ndarray) -> Points:
        return Points(self.params[index], self.tokens[index], self.loss[index])


@dataclass
class Fit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the summed (or averaged) Huber loss at the optimum
    points: int

    def loss(self, params, tokens):
        return self.E + self.A / np.asarray(params, float) ** self.alpha + self.B / np.asarray(tokens, float) ** self.beta

    def frontier(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising the fitted loss at training compute C = 6 N D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        c = np.asarray(flops, float) / 6
        return g * c ** (b / (a + b)), c ** (a / (a + b)) / g


def read_points(path: Path) -> Points:
    """A CSV with columns `params`, `loss` and `tokens` (or `flops`, tokens = flops / 6 params)."""
    if not path.is_file():
        raise UserError(f"points file not found: {path}")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a CSV file ({e})") from None
    columns = set(rows[0]) if rows else set()
    missing = {"params", "loss"} - columns or ({"tokens or flops"} if not {"tokens", "flops"} & columns else set())
    if missing:
        raise UserError(f"{path}: needs the columns params, loss and tokens (or flops); missing {', '.join(sorted(missing))}")
    values = {}
    for key in ("params", "loss", "tokens" if "tokens" in columns else "flops"):
        try:
            values[key] = np.array([float(r[key]) for r in rows])
        except (TypeError, ValueError):
            bad = next(i for i, r in enumerate(rows) if not _number(r[key]))
            raise UserError(f"{path}: row {bad + 2}: {key}={rows[bad][key]!r} is not a number") from None
        if not (np.isfinite(values[key]) & (values[key] > 0)).all():
            bad = int(np.argmin(np.isfinite(values[key]) & (values[key] > 0)))
            raise UserError(f"{path}: row {bad + 2}: {key}={rows[bad][key]} must be a positive number")
    tokens = values["tokens"] if "tokens" in values else values["flops"] / (6 * values["params"])
    if len(rows) < 2 * len(NAMES):
        raise UserError(f"{path}: {len(rows)} points for {len(NAMES)} constants; give at least {2 * len(NAMES)}")
    return Points(values["params"], tokens, values["loss"])


def _number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def objective(theta: np.ndarray, pts: Points, reduction: str = "sum") -> tuple[float, np.ndarray]:
    """The Huber objective at theta = (e, a, b, alpha, beta) and its gradient."""
    e, a, b, alpha, beta = theta
    log_n, log_d, log_l = np.log(pts.params), np.log(pts.tokens), np.log(pts.loss)
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, P)
    pred = logsumexp(terms, axis=0)
    r = pred - log_l
    small = np.abs(r) <= DELTA
    value = np.where(small, 0.5 * r**2, DELTA * (np.abs(r) - 0.5 * DELTA))
    dr = np.where(small, r, DELTA * np.sign(r))  # d Huber / d residual
    w = np.exp(terms - pred)  # softmax over the three terms
    grad = np.stack([w[2], w[0], w[1], -w[0] * log_n, -w[1] * log_d]) @ dr
    scale = 1.0 / len(r) if reduction == "mean" else 1.0
    return float(value.sum() * scale), grad * scale


def _minimise(start: np.ndarray, pts: Points, reduction: str, tight: bool):
    options = {"ftol": 0.0, "gtol": 1e-14, "maxiter": 50_000, "maxfun": 100_000} if tight else {}
    return minimize(objective, start, args=(pts, reduction), jac=True, method="L-BFGS-B", options=options)


def fit(pts: Points, reduction: str = "sum", tight: bool = True, starts: int = STARTS) -> Fit:
    """Approach 3 from Hoffmann's grid (module docstring): the best of L-BFGS runs from the `starts`
    grid points with the lowest objective."""
    grid = np.array(list(itertools.product(*GRID)))
    values = np.array([objective(theta, pts, reduction)[0] for theta in grid])
    best = min((_minimise(grid[i], pts, reduction, tight) for i in np.argsort(values)[:starts]), key=lambda r: r.fun)
    return _as_fit(best.x, best.fun, len(pts))


def _as_fit(theta: np.ndarray, value: float, n: int) -> Fit:
    e, a, b, alpha, beta = (float(v) for v in theta)
    return Fit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, float(value), n)


def bootstrap(pts: Points, best: Fit, samples: int = 200, seed: int = 0) -> list[Fit]:
    """Refits on `samples` resamples of the points (with replacement), each started at `best`; a refit
    whose constants run off past a float's range (a resample with no floor or no curvature in N or D:
    exp(log A) overflows) is left out, so the list may be shorter (the reports say how many remain)."""
    rng = np.random.default_rng(seed)
    # A constant fitted to 0 (E of a loss with no floor) is started at the smallest normal float: log 0 = -inf
    # would leave L-BFGS where it starts, and every refit equal to `best`
    start = np.log(np.maximum([best.E, best.A, best.B], np.finfo(float).tiny)).tolist()
    theta = np.array([start[0], start[1], start[2], best.alpha, best.beta])
    out = []
    for _ in range(samples):
        sub = pts.subset(rng.integers(0, len(pts), len(pts)))
        r = _minimise(theta, sub, "sum", tight=True)
        try:
            out.append(_as_fit(r.x, r.fun, len(sub)))
        except OverflowError:
            continue
    return out


def summary(best: Fit, boot: list[Fit], flops: float) -> dict:
    """fit.json: the constants with bootstrap standard errors and 95 % intervals, and the frontier
    (N_opt, D_opt, tokens per parameter, predicted loss) at `flops`, with intervals."""
    out = {"fit": asdict(best), "bootstrap": [[getattr(f, k) for k in NAMES] for f in boot], "constants": {},
           "frontier": {"flops": flops}}
    for name in NAMES:
        values = np.array([getattr(f, name) for f in boot])
        out["constants"][name] = _stats(getattr(best, name), values)
    n, d = best.frontier(flops)
    per = [f.frontier(flops) for f in boot]
    out["frontier"] |= {"N_opt": _stats(float(n), np.array([p[0] for p in per])),
                        "D_opt": _stats(float(d), np.array([p[1] for p in per])),
                        "tokens_per_param": _stats(float(d / n), np.array([p[1] / p[0] for p in per])),
                        "loss": _stats(float(best.loss(n, d)), np.array([f.loss(*f.frontier(flops)) for f in boot]))}
    return out


def from_constants(values, points: int = 0, objective: float = math.nan) -> Fit:
    """A Fit from (E, A, B, alpha, beta) as fit.json keeps them."""
    return Fit(*(float(v) for v in values), objective=objective, points=points)


def _stats(value: float, samples: np.ndarray) -> dict:
    lo, hi = np.percentile(samples, [2.5, 97.5]) if len(samples) else (math.nan, math.nan)
    return {"value": value, "se": float(samples.std(ddof=1)) if len(samples) > 1 else math.nan,
            "ci95": [float(lo), float(hi)]}
