"""What `graft scale sweep` writes from its finished runs: DIR/points.csv, DIR/fit/ (approach 3) and
DIR/report.md with sweep.png (approach 2 beside approach 3).

Both approaches are read on the sweep's measured compute: approach 2 directly (its profiles are the
runs at each budget); approach 3's L(N, D) is minimised along each budget's isoFLOP line,
D = C / FLOPs-per-token(N), with FLOPs per token measured per ladder size and interpolated in log-log
between them (the runs' C is counted, not 6 N D: vision and attention are in it). Where the two
approaches disagree the report says by how much; nothing is reconciled.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from graft import atomic, isoflop, scaling
from graft.report import png_bytes, pyplot
from graft.scale import fit_command

COLUMNS = ("run", "size", "seed", "budget", "steps", "params", "non_embedding", "tokens", "samples", "flops", "loss")


def collect(runs, out: Path) -> list[dict]:
    """A row per finished run (a run without a held-out loss is not a point)."""
    rows = []
    for r in runs:
        try:
            loss = json.loads((out / "runs" / r.name / "eval.json").read_text())["heldout_loss"]
        except (OSError, ValueError, KeyError):
            continue
        rows.append({"run": r.name, "size": r.size.name, "seed": r.seed, "budget": r.budget, "steps": r.steps,
                     "params": r.size.params, "non_embedding": r.size.non_embedding, "tokens": r.steps * r.tokens_per_step,
                     "samples": r.steps * r.samples_per_step, "flops": r.steps * r.flops_per_step, "loss": loss})
    return rows


def write(runs, out: Path, command: str, samples: int = 200, recipe: str = "", overrides: tuple = ()) -> Path:
    rows = collect(runs, out)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(out / "points.csv", text.getvalue())
    budget = np.array([r["budget"] for r in rows])
    n, d, loss = (np.array([r[k] for r in rows], float) for k in ("params", "tokens", "loss"))
    per_token = _per_token(runs)
    found = isoflop.profiles(budget, n, d, loss)
    two = isoflop.exponents(found)
    boot2 = isoflop.bootstrap(found, samples) if two else []
    three = None
    if len(rows) >= 2 * len(scaling.NAMES):
        summary = fit_command(out / "points.csv", out / "fit", samples=samples, flops=float(budget.max()))
        three = scaling.from_constants([summary["fit"][k] for k in scaling.NAMES])
    atomic.write_bytes(out / "sweep.png", _plot(rows, found, three, per_token))
    report = _report(rows, found, two, boot2, three, per_token, command, samples, _schedule(runs))
    atomic.write_text(out / "report.md", report)
    atomic.write_text(out / "sweep.json", json.dumps({
        "recipe": recipe, "overrides": list(overrides), "command": command,
        "approach2": {"profiles": [{"flops": p.flops, "n_opt": p.n_opt, "d_opt": p.d_opt, "loss_opt": p.loss_opt,
                                    "bracketed": p.bracketed} for p in found], "exponents": two,
                      "bootstrap": boot2},
        "approach3": None if three is None else {k: getattr(three, k) for k in scaling.NAMES},
        "flops_per_token": {str(k): v for k, v in per_token.items()}}, indent=1))
    return out / "report.md"


def _per_token(runs) -> dict[int, float]:
    """Measured training FLOPs per LM token of each ladder size (keyed by its parameter count)."""
    return {r.size.params: r.flops_per_step / r.tokens_per_step for r in runs}


def optimum3(fit: scaling.Fit, flops: float, per_token: dict[int, float]) -> tuple[float, float]:
    """Approach 3's N_opt and loss along the isoFLOP line of measured compute `flops`."""
    sizes = np.array(sorted(per_token), float)
    fpt = np.array([per_token[int(s)] for s in sizes])
    grid = np.exp(np.linspace(math.log(sizes[0]) - 1, math.log(sizes[-1]) + 1, 400))
    slope = np.polyfit(np.log(sizes), np.log(fpt), 1)[0] if len(sizes) > 1 else 0.0
    log_fpt = np.interp(np.log(grid), np.log(sizes), np.log(fpt))
    outside = (np.log(grid) - np.clip(np.log(grid), np.log(sizes[0]), np.log(sizes[-1]))) * slope
    tokens = flops / np.exp(log_fpt + outside)
    losses = fit.loss(grid, tokens)
    i = int(np.argmin(losses))
    return float(grid[i]), float(losses[i])


def _schedule(runs) -> str:
    """What learning-rate schedule the points come from (docs/scaling.md)."""
    if any(r.parent for r in runs):
        return ("Schedule: warmup-stable-decay (optim.schedule=wsd); each size and seed trained once to its longest "
                "budget, every shorter budget's run decayed from that run's checkpoint at its own decay start "
                "(graft/sweep_wsd.py).")
    return "Schedule: each run's own, ending at its budget (train.steps = its steps)."


def _report(rows, found, two, boot2, three, per_token, command, samples, schedule: str = "") -> str:
    lines = ["# graft scale sweep", "", f"`{command}`", "", schedule, "",
             "| run | params | steps | tokens | FLOPs | held-out loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['params']:,} | {r['steps']} | {r['tokens']:.3g} | {r['flops']:.3g} | {r['loss']:.4f} |"
              for r in rows]
    lines += ["", "## Approach 2: isoFLOP profiles", ""]
    if not found:
        lines.append("No budget has runs of three sizes: no profile to fit.")
    else:
        lines += ["| budget | N_opt | D_opt | loss at N_opt | within the sizes trained |", "|---|---|---|---|---|"]
        for p in found:
            lines.append(f"| {p.flops:.3g} | {p.n_opt:.4g} | {p.d_opt:.4g} | {p.loss_opt:.4f} | "
                         f"{'yes' if p.bracketed else 'no (extrapolated)'} |" if p.has_minimum else
                         f"| {p.flops:.3g} | - | - | - | no minimum (the parabola opens downwards) |")
    if two:
        lines += ["", _interval("N_opt ∝ C^a: a", two["a"], [b["a"] for b in boot2]),
                  _interval("D_opt ∝ C^b: b", two["b"], [b["b"] for b in boot2]),
                  f"(through the minima of {two['budgets']} budgets; intervals from the {len(boot2)} of {samples} "
                  "bootstrap refits over each profile's points that still bracket two minima)"]
    elif found:
        lines += ["", "Fewer than two profiles have a minimum within the sizes trained: no exponents (add sizes "
                  "around the optimum, or budgets)."]
    lines += ["", "## Approach 3: L(N, D) = E + A/N^alpha + B/D^beta", ""]
    if three is None:
        lines.append(f"{len(rows)} points: approach 3 needs at least {2 * len(scaling.NAMES)}.")
    else:
        lines += [f"E {three.E:.4g}, A {three.A:.4g}, B {three.B:.4g}, alpha {three.alpha:.4g}, beta {three.beta:.4g} "
                  "(intervals: [fit/report.md](fit/report.md)).", "",
                  "| budget | N_opt, approach 2 | N_opt, approach 3 | approach 3 / approach 2 |", "|---|---|---|---|"]
        for p in found:
            n3, _ = optimum3(three, p.flops, per_token)
            two_n = f"{p.n_opt:.4g}" + ("" if p.bracketed else " (extrapolated)") if p.has_minimum else "-"
            ratio = f"{n3 / p.n_opt:.2f}" if p.bracketed else "-"
            lines.append(f"| {p.flops:.3g} | {two_n} | {n3:.4g} | {ratio} |")
    return "\n".join(lines + ["", "![the sweep](sweep.png)", ""])


def _interval(label: str, value: float, samples: list[float]) -> str:
    if len(samples) < 2:
        return f"{label} = {value:.3f}"
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return f"{label} = {value:.3f} (95 %: {lo:.3f} – {hi:.3f})."


def _plot(rows, found, three, per_token) -> bytes:
    fig, (ax, opt) = pyplot().subplots(1, 2, figsize=(11, 4))
    flops = np.array([r["flops"] for r in rows])
    n = np.array([r["params"] for r in rows], float)
    dots = ax.scatter(flops, [r["loss"] for r in rows], c=np.log10(n), cmap="viridis", s=18)
    fig.colorbar(dots, ax=ax, label="log10 N")
    ax.set(xscale="log", xlabel="training FLOPs (measured)", ylabel="held-out loss", title="runs")
    for p in found:
        x = np.linspace(np.log(p.params.min()), np.log(p.params.max()), 50)
        opt.plot(np.exp(x), np.polyval(p.parabola, x), "-", label=f"C={p.flops:.2g}")
        opt.scatter(p.params, p.loss, s=12)
        if p.has_minimum:
            opt.plot([p.n_opt], [p.loss_opt], "k*", ms=10)
        if three is not None:
            n3, l3 = optimum3(three, p.flops, per_token)
            opt.plot([n3], [l3], "rx", ms=8)
    opt.set(xscale="log", xlabel="parameters N", ylabel="held-out loss",
            title="isoFLOP profiles (* approach 2, x approach 3)")
    opt.tick_params(axis="x", which="minor", labelbottom=False)  # the log axis' minor labels overlap
    if found:
        opt.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig, 100)
