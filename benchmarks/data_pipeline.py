"""Benchmark of the streaming data pipeline: shard read + decode + transform + tokenise.

Writes the built-in world as webdataset shards (PNG at --image-size), then measures
  - read_only_samples_per_s: tar reading and key grouping alone (one process);
  - pipeline_samples_per_s_per_worker: the whole per-record path (read, image decode with the
    header check, resize + normalise, chat template + tokenizer + labels, collate), for 0 workers
    (in the main process) and for 1 and 2 DataLoader workers (per worker);
  - data_wait_frac: the fraction of training step time spent waiting for data, in a short
    `tiny` run on the same shards with data.workers=2 (mean of the logged windows after the first).
Reproduce with:

    python benchmarks/data_pipeline.py [--n 2000] [--image-size 64] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from graft.config_checks import apply_overrides
from graft.data.check import processor_for
from graft.data.export import export_shapes
from graft.data.loader import StreamBatches
from graft.data.skips import SkipLog
from graft.data.sources import build_sources
from graft.data.streaming import StreamDataset, fresh_position
from graft.recipes import shapes_vqa, tiny
from graft.trainer.loop import train
from graft.trainer.metrics import read


def read_only(cfg, n: int) -> float:
    (source,), _ = build_sources(cfg)
    t = time.perf_counter()
    count = sum(1 for _ in islice(source.epoch(0, 0, 1, SkipLog()), n))
    return count / (time.perf_counter() - t)


def in_process(cfg, proc, n: int) -> float:
    sources, weights = build_sources(cfg)
    ds = StreamDataset(sources, weights, proc, cfg.data, 16, 0, 1, 1, {}, 0)
    t = time.perf_counter()
    count = sum(out is not None for out in islice(ds.examples(0, 1, fresh_position(1), SkipLog()), n))
    return count / (time.perf_counter() - t)


def with_workers(cfg, proc, workers: int, batches: int) -> float:
    """Samples/s per worker once the workers are up (the first batch per worker is not timed)."""
    cfg = apply_overrides(cfg, [f"data.workers={workers}"])
    sources, weights = build_sources(cfg)
    stream = StreamBatches(cfg, proc, sources, weights, 0, 1, None)
    for _ in range(workers):
        stream.batch(0, 0)
    t = time.perf_counter()
    samples = sum(stream.batch(0, 0)["input_ids"].shape[0] for _ in range(batches))
    rate = samples / (time.perf_counter() - t)
    stream.close()
    return rate / workers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-data-bench-"))
    world = apply_overrides(shapes_vqa(), [f"vision.image_size={args.image_size}"])
    t = time.perf_counter()
    export_shapes(world, "webdataset", root / "shards", args.n, shard_size=500)
    export_s = time.perf_counter() - t
    last = (args.n - 1) // 500
    source = ["data.source=webdataset", f"data.shards={root}/shards/shapes-{{000000..{last:06d}}}.tar",
              "train.progress=false", "eval.splits=", "train.peak_flops=1e11"]
    cfg = apply_overrides(tiny(), source)
    proc = processor_for(cfg)
    figures = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "records": args.n, "image_px": args.image_size, "model_image_px": cfg.vision.image_size,
        "export_samples_per_s": round(args.n / export_s),
        "read_only_samples_per_s": round(read_only(cfg, args.n)),
        "pipeline_samples_per_s_per_worker": {
            "0 (main process)": round(in_process(cfg, proc, args.n)),
            "1": round(with_workers(cfg, proc, 1, 60)),
            "2": round(with_workers(cfg, proc, 2, 60)),
        },
    }
    run = root / "run"
    train(apply_overrides(tiny(), [*source, "data.workers=2", f"train.steps={args.steps}", "train.log_every=10"]), run)
    steps = [r for r in read(run) if r.get("event") != "eval"][1:]
    figures["train_data_wait_frac"] = round(sum(r["data_wait_frac"] for r in steps) / max(1, len(steps)), 4)
    figures["train_samples_per_s"] = round(sum(r["samples_per_s"] for r in steps) / max(1, len(steps)), 1)
    print(json.dumps(figures, indent=1))
    print(f"\ncommand: python benchmarks/data_pipeline.py --n {args.n} --image-size {args.image_size} --steps {args.steps}")


if __name__ == "__main__":
    main()
