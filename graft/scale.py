"""`graft scale fit POINTS.csv --out OUT` and `graft scale predict OUT --flops C`.

`fit` reads (params, tokens or flops, loss) points (graft/scaling.py `read_points`), optionally
drops the K highest-loss points (Besiroglu et al. drop Chinchilla's 5), fits L(N, D) = E + A/N^alpha
+ B/D^beta (approach 3, `scaling.fit`), bootstraps it, and writes

    OUT/fit.json    the constants with standard errors and 95 % intervals, the frontier at
                    --flops, and every bootstrap fit's constants (what `predict` reads)
    OUT/report.md   the same as tables, with fit.png: loss against compute coloured by N with the
                    fitted frontier, the residuals, and N_opt(C), D_opt(C) with their bootstrap band

`predict` gives the compute-optimal N and D and the predicted loss at a training compute, with the
bootstrap's 95 % intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graft import atomic, scaling
from graft.errors import UserError
from graft.report import png_bytes, pyplot

CHINCHILLA_FLOPS = 5.76e23  # Chinchilla's training compute: the default frontier point


def fit_command(points: Path, out: Path, drop_highest: int = 0, samples: int = 200,
                flops: float = CHINCHILLA_FLOPS) -> dict:
    pts = scaling.read_points(points)
    if not 0 <= drop_highest <= len(pts) - 2 * len(scaling.NAMES):
        raise UserError(f"--drop-highest={drop_highest}: keep at least {2 * len(scaling.NAMES)} of the {len(pts)} points")
    if samples < 2 or flops <= 0:
        raise UserError(f"--bootstrap={samples} must be >= 2 and --flops={flops} positive")
    kept = pts.subset(np.sort(np.argsort(pts.loss, kind="stable")[: len(pts) - drop_highest]))
    best = scaling.fit(kept)
    boot = scaling.bootstrap(kept, best, samples)
    summary = scaling.summary(best, boot, flops)
    summary |= {"points_file": str(points), "dropped_highest": drop_highest, "bootstrap_diverged": samples - len(boot)}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "fit.json", json.dumps(summary, indent=1))
    atomic.write_bytes(out / "fit.png", _plot(kept, best, summary))
    atomic.write_text(out / "report.md", report(summary))
    return summary


def predict(fit_dir: Path, flops: float) -> dict:
    """N_opt, D_opt and the loss at `flops`, each with the bootstrap's 95 % interval."""
    path = fit_dir / "fit.json"
    if not path.is_file():
        raise UserError(f"{fit_dir} holds no fit.json (write one with `graft scale fit POINTS.csv --out {fit_dir}`)")
    if flops <= 0:
        raise UserError(f"--flops={flops} must be positive")
    data = json.loads(path.read_text())
    best = scaling.from_constants([data["fit"][k] for k in scaling.NAMES])
    boot = [scaling.from_constants(v) for v in data["bootstrap"]]
    return scaling.summary(best, boot, flops)["frontier"]


def report(summary: dict) -> str:
    f = summary["fit"]
    lines = ["# Scaling-law fit", "",
             f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {f['points']} points of `{summary['points_file']}`"
             f" (the {summary['dropped_highest']} highest-loss points dropped) by minimising the summed Huber "
             f"loss (delta 1e-3) of log-loss residuals with L-BFGS from Hoffmann et al.'s grid: objective "
             f"{f['objective']:.7f}. Intervals: {len(summary['bootstrap'])} bootstrap refits"
             + (f" ({summary['bootstrap_diverged']} more diverged and are left out)." if summary.get("bootstrap_diverged")
                else "."), "",
             "| constant | value | s.e. | 95 % interval |", "|---|---|---|---|"]
    for name, s in summary["constants"].items():
        lines.append(f"| {name} | {s['value']:.4g} | {s['se']:.3g} | {s['ci95'][0]:.4g} – {s['ci95'][1]:.4g} |")
    fr = summary["frontier"]
    lines += ["", f"Compute-optimal at C = {fr['flops']:.3g} FLOPs (C = 6 N D):", "",
              "| quantity | value | 95 % interval |", "|---|---|---|"]
    for key in ("N_opt", "D_opt", "tokens_per_param", "loss"):
        s = fr[key]
        lines.append(f"| {key} | {s['value']:.4g} | {s['ci95'][0]:.4g} – {s['ci95'][1]:.4g} |")
    return "\n".join(lines + ["", "![fit](fit.png)", ""])


def _plot(pts: scaling.Points, best: scaling.Fit, summary: dict) -> bytes:
    plt = pyplot()
    fig, (ax, res, opt) = plt.subplots(1, 3, figsize=(15, 4.5))
    flops = 6 * pts.params * pts.tokens
    dots = ax.scatter(flops, pts.loss, c=np.log10(pts.params), s=10, cmap="viridis")
    fig.colorbar(dots, ax=ax, label="log10 N")
    grid = np.logspace(np.log10(flops.min()), np.log10(flops.max()), 50)
    ax.plot(grid, best.loss(*best.frontier(grid)), "k-", label="fitted frontier")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="loss and the fitted frontier")
    ax.legend()
    res.scatter(best.loss(pts.params, pts.tokens), np.log(best.loss(pts.params, pts.tokens)) - np.log(pts.loss), s=8)
    res.axhline(0, color="k", lw=0.8)
    res.set(xlabel="fitted loss", ylabel="log fitted - log observed", title="residuals")
    boot = [scaling.from_constants(v) for v in summary["bootstrap"]]
    for i, (label, colour) in enumerate((("N_opt", "C0"), ("D_opt", "C1"))):
        band = np.array([f.frontier(grid)[i] for f in boot])
        opt.plot(grid, best.frontier(grid)[i], color=colour, label=label)
        opt.fill_between(grid, *np.percentile(band, [2.5, 97.5], axis=0), color=colour, alpha=0.25)
    opt.set(xscale="log", yscale="log", xlabel="training FLOPs C", title="compute-optimal N and D (95 % band)")
    opt.legend()
    fig.tight_layout()
    return png_bytes(fig, 100)
