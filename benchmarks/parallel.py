"""Training throughput on this machine: one process against 2 processes under DDP and FSDP2.

Each row is a real `graft train` run of the same recipe at the same global batch (one process: 2B
in one step with all the cores; torchrun: B per process, one core each, gloo). Samples/s is the
median over the logged windows after the first (which holds the FLOP counting and warm-up), from
the run's metrics.jsonl; peak memory is process 0's resident peak.

    python benchmarks/parallel.py [--recipe shapes_vqa] [--steps 60] [--batch 32]

Prints a table and the ratios to one process. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(recipe: str, out: Path, steps: int, batch: int, nproc: int, kind: str) -> dict:
    sets = ["--set", f"train.steps={steps}", "--set", "train.log_every=5", "--set", "train.progress=false",
            "--set", "eval.splits=", "--set", f"train.ckpt_every={steps}", "--set", f"train.batch_size={batch}",
            "--set", f"parallel.kind={kind}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "graft", "train", recipe, "--out", str(out), *sets]
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "graft", "train", recipe, "--out", str(out), *sets]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**env, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("event") != "eval"][1:]
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
            "mfu": statistics.median(r["mfu"] for r in rows), "peak_mem_gb": rows[-1]["peak_mem_gb"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="shapes_vqa")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="per process under torchrun; one process takes 2x")
    args = ap.parse_args()
    cases = [("one process", 1, "none", 2 * args.batch), ("2 processes, DDP", 2, "ddp", args.batch),
             ("2 processes, FSDP2", 2, "fsdp2", args.batch)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, kind, batch in cases:
            results[name] = train(args.recipe, Path(tmp) / kind, args.steps, batch, nproc, kind)
    base = results["one process"]["samples_per_s"]
    print(f"{args.recipe}, global batch {2 * args.batch}, {args.steps} steps, {os.cpu_count()} CPU cores")
    print("| setup | samples/s | vs one process | MFU | peak memory (process 0) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x | {100 * r['mfu']:.1f} % "
              f"| {r['peak_mem_gb']:.2f} GB |")
    print(f"command: python benchmarks/parallel.py --recipe {args.recipe} --steps {args.steps} --batch {args.batch}")


if __name__ == "__main__":
    main()
