"""Benchmark of a recipe trained and evaluated, with wall time (default: `graft demo`'s recipe).

Prints training wall time (training only and total), throughput, MFU, data-wait fraction, the
evaluation (VQA accuracy and CIDEr for a VLM; zero-shot and retrieval for a dual encoder) on the
test and compositional splits, and the Shapes world's generation speed per core. Reproduce with:

    python benchmarks/demo.py [--recipe NAME] [--out DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from graft.config_checks import apply_overrides
from graft.data.world_source import make_world
from graft.recipes import DEMO, RECIPES
from graft.trainer.loop import train
from graft.trainer.metrics import read


def world_speed(cfg, n: int = 3000) -> float:
    """Samples per second of the recipe's Shapes world on one thread (render + captions + questions)."""
    w = make_world(cfg)
    t = time.perf_counter()
    for i in range(n):
        w.sample("train", i)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default=DEMO, choices=sorted(RECIPES))
    p.add_argument("--out")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="graft-bench-"))
    cfg = apply_overrides(RECIPES[args.recipe](), ["train.progress=false", *args.set])
    t0 = time.perf_counter()
    results = train(cfg, out)
    total = time.perf_counter() - t0
    steps = [r for r in read(out) if r.get("event") != "eval"]
    train_s = sum(cfg.train.log_every * cfg.train.batch_size / r["samples_per_s"] for r in steps)
    last = steps[-1]
    mean = lambda k: sum(r[k] for r in steps[1:]) / max(1, len(steps) - 1)  # noqa: E731  (skip warm-up window)
    figures = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "steps": last["step"],
        "train_seconds": round(train_s, 1),
        "total_seconds_incl_setup_and_eval": round(total, 1),
        "samples_per_s": round(mean("samples_per_s"), 1),
        "tokens_per_s": round(mean("tokens_per_s")),
        "mfu": round(mean("mfu"), 3),
        "data_wait_frac": round(mean("data_wait_frac"), 3),
        "world_samples_per_s_per_core": round(world_speed(cfg)),
        **{k: v for k, v in results.items() if k.count("/") <= 1},
    }
    print(json.dumps(figures, indent=1))
    print(f"\nrun directory: {out}\ncommand: python benchmarks/demo.py --recipe {args.recipe} {' '.join('--set ' + s for s in args.set)}")


if __name__ == "__main__":
    main()
