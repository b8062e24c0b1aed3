"""BLIP's CapFilt on the noisy-web world (docs/curation.md): CLIP trained at the same compute on the
noisy pool's own captions, on a VLM's captions of the same images, on a mix, and on CapFilt's
bootstrapped set (both kinds of caption, each kept only where a CLIP scorer finds it matches);
3 seeds, zero-shot and retrieval on the clean world.

    python benchmarks/capfilt_study.py [--out runs/capfilt] [--pool 10000] [--seeds 3] [--budget 3.3e12]

Steps, each a graft command (printed as it runs; re-running reuses what is done):
1. `graft data export-noisy`: the pool, with its default noise (mismatched, fragment and boilerplate
   captions, duplicates, leaked test scenes; docs/curation.md).
2. The captioner: `shapes_vqa` as it is (the demo's VLM, trained on the clean world's conversations,
   a caption in a quarter of them). The scorer: `clip` trained 150 steps on the clean world.
3. `graft data recaption` the pool with the captioner (greedy), once as is and once with CapFilt's
   filter (`--filter-with` the scorer, `--min-score` the pool's 40 % quantile of its own captions'
   scores, from `graft data score`).
4. `graft compare` of the `clip` recipe at one FLOP budget: `original` (the pool's captions),
   `synthetic` (data.caption_mix=1: the VLM's caption wherever it wrote one), `mixed` (0.8, as
   Recap-DataComp found best), `capfilt` (the filtered shards, caption_mix=0.5 where both passed).
OUT/report.md holds the table (mean ± sd over seeds); OUT/capfilt.png plots it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import pyarrow.parquet as pq

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from datacomp_study import METRICS, run, shards, summary  # noqa: E402 (its neighbour: the same steps and table)
DROP = 0.4  # CapFilt's threshold: the scorer's similarity below which the pool's worst 40 % of own captions fall


def prepare(out: Path, pool: int) -> float:
    if not (out / "pool").exists():
        run(["data", "export-noisy", "--out", out / "pool", "--n", pool])
    for name, recipe, sets in (("captioner", "shapes_vqa", ["eval.splits=[test]"]),
                               ("scorer", "clip", ["train.steps=150", "eval.splits=[test]"])):
        if not (out / name / "report.md").exists():
            run(["train", recipe, "--out", out / name, "--set", "train.progress=false",
                 *(a for s in sets for a in ("--set", s))])
    run(["data", "recaption", out / "pool", "--with", out / "captioner", "--out", out / "recaptioned"])
    run(["data", "score", out / "pool", "--with", out / "scorer", "--out", out / "scores"])
    scores = sorted(s for f in (out / "scores").glob("*.parquet") for s in pq.read_table(f)["score"].to_pylist())
    threshold = scores[int(DROP * len(scores))]
    run(["data", "recaption", out / "pool", "--with", out / "captioner", "--out", out / "capfilt",
         "--filter-with", out / "scorer", "--min-score", f"{threshold:.4f}"])
    return threshold


def plot(table: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    arms = list(table)
    for k, metric in enumerate(METRICS):
        xs = [i + (k - 1) * 0.25 for i in range(len(arms))]
        ax.bar(xs, [table[a][metric][0] for a in arms], width=0.25, yerr=[table[a][metric][1] for a in arms],
               capsize=3, label=metric)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("clean test split (mean ± sd)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_study() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/capfilt")
    p.add_argument("--pool", type=int, default=10000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=3.3e12)
    args = p.parse_args()
    out = Path(args.out)
    threshold = prepare(out, args.pool)
    web = "clip data.source=webdataset"
    arms = [f"original={web} 'data.shards=[{shards(out / 'pool')}]'",
            f"synthetic={web} 'data.shards=[{shards(out / 'recaptioned')}]' data.caption_mix=1.0",
            f"mixed={web} 'data.shards=[{shards(out / 'recaptioned')}]' data.caption_mix=0.8",
            f"capfilt={web} 'data.shards=[{shards(out / 'capfilt')}]' data.caption_mix=0.5"]
    argv = ["compare", "--budget", args.budget, "--seeds", args.seeds, "--out", out / "compare",
            "--set", "train.progress=false", "--set", "eval.splits=[test]"]
    run([*argv, *(a for arm in arms for a in ("--arm", arm))])
    table = summary(json.loads((out / "compare" / "compare.json").read_text()))
    kept = {}
    for f in (out / "capfilt").glob("*.parquet"):
        for choice in pq.read_table(f)["kept"].to_pylist():
            kept[choice] = kept.get(choice, 0) + 1
    lines = ["| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(f"{v[m][0]:.3f} ± {v[m][1]:.3f}" for m in METRICS) + " |"
              for name, v in table.items()]
    lines += ["", f"CapFilt's filter (min score {threshold:.4f}, the pool's {DROP:.0%} quantile): records keeping "
              + ", ".join(f"{k} {n}" for k, n in sorted(kept.items()))]
    plot(table, out / "capfilt.png")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {out / 'report.md'}, plot: {out / 'capfilt.png'}")


if __name__ == "__main__":
    main_study()
