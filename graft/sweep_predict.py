"""`graft scale predict SWEEP_DIR --flops C [--train --seeds K]`: a sweep's compute-optimal run at a
new budget, predicted before it is trained.

From the sweep's DIR/sweep.json and its approach-3 fit (DIR/fit/fit.json with its bootstrap fits):
along the isoFLOP line of measured compute C (sweep_report.optimum3) N_opt, and approach 2's
N_opt = kN C^a beside it. The ladder's size nearest N_opt (graft/ladder.py), trained to C, is the
ready `graft train` command; its predicted held-out loss is the fit at that size and its tokens,
with the 95 % interval of the bootstrap fits.

With `--train`, the prediction is written first (DIR/predictions/C<budget>/prediction.json, never
overwritten), then the command is trained for K seeds as the sweep trains its runs, and the report
gives the absolute relative error of the prediction against the seeds' mean held-out loss beside
the seeds' own spread (Choshen et al. read such errors against 5 / 10 / 15 % bands).
"""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

import numpy as np

from graft import atomic, scaling
from graft.errors import UserError
from graft.sweep import execute, finished, plan
from graft.sweep_report import optimum3


def predict(sweep_dir: Path, flops: float, seeds: int = 1, jobs: int = 1) -> dict:
    """The prediction at `flops` (module docstring), with the plan of its runs."""
    info, fit, boot = _read(sweep_dir)
    if flops <= 0:
        raise UserError(f"--flops={flops} must be positive")
    per_token = {int(k): v for k, v in info["flops_per_token"].items()}
    n_opt, _ = optimum3(fit, flops, per_token)
    two = info["approach2"]["exponents"]
    runs = plan(info["recipe"], [flops], [f"{n_opt:.0f}"], seeds, info["overrides"], jobs)
    run = runs.runs[0]
    tokens = run.steps * run.tokens_per_step
    band = [f.loss(run.size.params, tokens) for f in boot]
    out = {"flops": flops, "N_opt": n_opt, "N_opt_approach2": None if two is None else two["kN"] * flops ** two["a"],
           "N_opt_ci95": list(np.percentile([optimum3(f, flops, per_token)[0] for f in boot], [2.5, 97.5])),
           "size": run.size.name, "params": run.size.params, "steps": run.steps, "tokens": tokens,
           "loss": float(fit.loss(run.size.params, tokens)), "loss_ci95": list(np.percentile(band, [2.5, 97.5])),
           "command": shlex.join(run.command(info["recipe"], _folder(sweep_dir, flops), info["overrides"], ["graft"])),
           "recipe": info["recipe"], "overrides": info["overrides"]}
    return {"prediction": out, "plan": runs}


def train_and_check(sweep_dir: Path, flops: float, seeds: int, jobs: int) -> dict:
    """Write the prediction, then train it for `seeds` seeds and compare (module docstring)."""
    made = predict(sweep_dir, flops, seeds, jobs)
    folder, pred = _folder(sweep_dir, flops), made["prediction"]
    path = folder / "prediction.json"
    if path.is_file():  # the one written before its runs trained is the prediction
        pred = json.loads(path.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(pred, indent=1))
    p = made["plan"]
    failed = execute(p, folder, pred["overrides"])
    if failed:
        raise UserError(f"{len(failed)} of {len(p.runs)} runs failed (logs in {folder / 'logs'})")
    done = finished(folder, p.runs)
    losses = [json.loads((folder / "runs" / r.name / "eval.json").read_text())["heldout_loss"] for r in p.runs
              if r.name in done]
    mean = statistics.mean(losses)
    check = {**pred, "observed": losses, "observed_mean": mean,
             "observed_sd": statistics.stdev(losses) if len(losses) > 1 else None,
             "abs_rel_error": abs(pred["loss"] - mean) / mean}
    atomic.write_text(folder / "check.json", json.dumps(check, indent=1))
    return check


def _folder(sweep_dir: Path, flops: float) -> Path:
    return sweep_dir / "predictions" / f"C{flops:.2e}".replace("+", "")


def _read(sweep_dir: Path):
    try:
        info = json.loads((sweep_dir / "sweep.json").read_text())
        fitted = json.loads((sweep_dir / "fit" / "fit.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{sweep_dir} holds no finished sweep with an approach-3 fit (sweep.json and fit/fit.json: "
                        "`graft scale sweep ... --out DIR` with at least 10 runs)") from None
    fit = scaling.from_constants([fitted["fit"][k] for k in scaling.NAMES])
    return info, fit, [scaling.from_constants(v) for v in fitted["bootstrap"]]
