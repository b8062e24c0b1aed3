"""Per-design training cost: samples/s and MFU of each design's recipe through the real trainer,
and how the language model's share of the work grows with the image's patches.

Part 1 trains each recipe for `--steps` steps with `graft train` (fp32, the trainer's own
throughput and MFU: measured FLOPs over wall time over the measured peak) and reports the median
of its log lines after the first. Part 2 counts, with torch's FLOP counter, the forward FLOPs per
example of the LM alone and of the whole model for images of 4x4, 6x6, 8x8 and 12x12 patches
(1x, 2.25x, 4x and 9x the patches): a projector's image tokens grow with the patches, pixel
shuffle divides them by r², average pooling, the resampler and the Q-Former keep them fixed.
Keep the machine otherwise idle for part 1.

    python benchmarks/designs.py [--steps 60] [--recipes shapes_vqa ...] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from graft.cli import _recipe
from graft.compare import first_batches

RECIPES = ("shapes_linear", "shapes_vqa", "shapes_pixel_shuffle", "shapes_avgpool", "shapes_resampler",
           "shapes_qformer", "shapes_qformer_stage1", "siglip")
GRIDS = (4, 6, 8, 12)  # patches per side (8 px patches): 16, 36, 64, 144 patches
SCALED = {"linear": [], "mlp": [], "pixel_shuffle": ["connector.scale_factor=2"],
          "avgpool": ["connector.tokens=4"], "resampler": ["connector.latents=9"], "qformer": []}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--skip-train", action="store_true", help="only part 2 (FLOP counts need no idle machine)")
    return p.parse_args()


def train_rate(recipe: str, steps: int, stage1: str | None) -> dict:
    """Median samples/s and MFU of `graft train RECIPE` over its log lines after the first."""
    from graft.trainer.loop import train
    from graft.trainer.metrics import read

    sets = [f"train.steps={steps}", "train.log_every=10", f"train.ckpt_every={steps}", "train.progress=false",
            "eval.splits=[]"]
    if recipe == "shapes_qformer":
        sets.append(f"connector.init_from={stage1}")
    with tempfile.TemporaryDirectory() as out:
        train(_recipe(recipe, sets), out)
        logs = [r for r in read(Path(out)) if "mfu" in r][1:]
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in logs),
            "mfu": statistics.median(r["mfu"] for r in logs)}


def forward_flops(cfg) -> tuple[float, float, int]:
    """Forward FLOPs per example of the LM and of the whole model, and image tokens per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _, batches = first_batches(cfg)
    batch = batches[0]  # padded rows (data.pack=false): one conversation per row
    n = batch["pixel_values"].shape[0]
    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model(**batch)
    per_module = counter.get_flop_counts()
    lm = sum(per_module.get(f"{type(model).__name__}.lm", {}).values())
    return lm / n, counter.get_total_flops() / n, model.num_image_tokens


def lm_growth(stage1: str | None) -> list[dict]:
    rows = []
    for kind, extra in SCALED.items():
        for grid in GRIDS:
            sets = [f"vision.image_size={8 * grid}", f"data.grid={grid}", "data.pack=false", f"connector.kind={kind}",
                    *extra, "lm.max_seq_len=320"]
            base = "shapes_qformer" if kind == "qformer" else "shapes_vqa"
            if kind == "qformer":
                sets = [s for s in sets if not s.startswith("connector.kind")]  # fresh Q-Former, any grid
            lm, total, tokens = forward_flops(_recipe(base, sets))
            rows.append({"connector": kind, "patches": grid * grid, "image_tokens": tokens, "lm": lm, "total": total})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}")
    stage1 = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            if "shapes_qformer" in args.recipes:
                from graft.trainer.loop import train

                stage1 = str(Path(tmp) / "stage1")
                train(_recipe("shapes_qformer_stage1", ["train.steps=20", "train.progress=false", "eval.splits=[]"]), stage1)
            print("| recipe | samples/s | MFU |\n|---|---|---|")
            for recipe in args.recipes:
                start = time.perf_counter()
                r = train_rate(recipe, args.steps, stage1)
                print(f"| {recipe} | {r['samples_per_s']:.0f} | {100 * r['mfu']:.1f} % |  ({time.perf_counter() - start:.0f} s)",
                      flush=True)
        rows = lm_growth(stage1)
    print("\nForward FLOPs per example (a conversation of the world: ~100 text tokens besides the image):")
    print("\n| connector | " + " | ".join(f"{g * g} patches" for g in GRIDS) + " |")
    print("|---" * (len(GRIDS) + 1) + "|")
    for kind in SCALED:
        mine = [r for r in rows if r["connector"] == kind]
        cells = [f"{r['image_tokens']} tokens: LM {r['lm'] / 1e6:.0f} M ({r['lm'] / mine[0]['lm']:.2f}x), "
                 f"{r['lm'] / r['total']:.0%} of all" for r in mine]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
