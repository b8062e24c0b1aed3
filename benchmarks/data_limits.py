"""What the per-record limits and checks cost on good data: this checkout against a reference commit.

The hostile-data work (data/limits.py, data/tar.py, the image format allow-list, control-token
handling) adds checks to every record. This benchmark writes the built-in world as webdataset
shards once, then times, in turn, the same in-process record path of this checkout and of
`--ref` (a git revision, checked out into a temporary worktree and imported from there):

  - read_records_per_s: shard reading and key grouping alone;
  - pipeline_records_per_s: read + decode + limits + chat template + tokenise + resize, one process.

Rounds alternate reference and current (R C R C ...), so drift of the machine's speed hits both;
the medians and the median of the per-round ratios are printed. Run it on an idle machine:

    python benchmarks/data_limits.py [--ref 6114de2] [--n 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside the tree under test: only APIs that both trees have.
PROBE = r"""
import json, sys, time
from itertools import islice
try:
    from graft.config_checks import apply_overrides
except ImportError:  # trees before config.py became a leaf
    from graft.config import apply_overrides
from graft.data.check import processor_for
from graft.data.skips import SkipLog
from graft.data.sources import build_sources
from graft.data.streaming import StreamDataset, fresh_position
from graft.recipes import tiny

shards, n = sys.argv[1], int(sys.argv[2])
cfg = apply_overrides(tiny(), ["data.source=webdataset", f"data.shards={shards}", "data.shuffle_buffer=0"])
proc = processor_for(cfg)
try:
    (source,), _ = build_sources(cfg)
except AttributeError:  # trees whose build_sources took the data section
    (source,), _ = build_sources(cfg.data)
t = time.perf_counter()
read = sum(1 for _ in islice(source.epoch(0, 0, 1, SkipLog()), n))
read_s = time.perf_counter() - t
ds = StreamDataset([source], [1.0], proc, cfg.data, 16, 0, 1, 1, {}, 0)
list(islice(ds.examples(0, 1, fresh_position(1), SkipLog()), 50))  # warm-up: tokenizer cache, PIL plugins
t = time.perf_counter()
used = sum(out is not None for out in islice(ds.examples(0, 1, fresh_position(1), SkipLog()), n))
pipe_s = time.perf_counter() - t
assert used == n, used
print(json.dumps({"read_records_per_s": read / read_s, "pipeline_records_per_s": used / pipe_s}))
"""


def probe(tree: Path, shards: str, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", PROBE, shards, str(n)], env=env, cwd=tree, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref", default="6114de2", help="reference git revision (default: main before the limits)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()

    from graft.config_checks import apply_overrides
    from graft.data.export import export_shapes
    from graft.recipes import shapes_vqa

    root = Path(tempfile.mkdtemp(prefix="graft-limits-bench-"))
    world = apply_overrides(shapes_vqa(), [f"vision.image_size={args.image_size}"])
    export_shapes(world, "webdataset", root / "shards", args.n, shard_size=500)
    shards = f"{root}/shards/shapes-{{000000..{(args.n - 1) // 500:06d}}}.tar"
    ref = root / "ref"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref), args.ref], check=True,
                   capture_output=True)
    try:
        runs = {"reference": [], "current": []}
        for _ in range(args.rounds):
            runs["reference"].append(probe(ref, shards, args.n))
            runs["current"].append(probe(REPO, shards, args.n))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref)], capture_output=True)
    figures = {"ref": args.ref, "records": args.n, "image_px": args.image_size, "rounds": args.rounds}
    for key in ("read_records_per_s", "pipeline_records_per_s"):
        ratios = [c[key] / r[key] for r, c in zip(runs["reference"], runs["current"])]
        figures[key] = {"reference": round(statistics.median(r[key] for r in runs["reference"])),
                        "current": round(statistics.median(c[key] for c in runs["current"])),
                        "current/reference (median of rounds)": round(statistics.median(ratios), 3)}
    print(json.dumps(figures, indent=1))
    print(f"\ncommand: python benchmarks/data_limits.py --ref {args.ref} --n {args.n} --rounds {args.rounds} "
          f"--image-size {args.image_size}")


if __name__ == "__main__":
    main()
