"""DataComp's filtering track on the noisy-web world (docs/curation.md): CLIP trained at the same
compute on the whole noisy pool, on a random subset, and on the top 10 / 30 / 50 % by CLIP score,
scored by a model trained on a small clean set; 3 seeds, zero-shot and retrieval on the clean world.

    python benchmarks/datacomp_study.py [--out runs/datacomp] [--pool 20000] [--seeds 3] [--budget 1.5e12]

Steps, each a graft command (printed as it runs; re-running reuses what is done):
1. `graft data export-noisy`: the pool, with its default noise (docs/curation.md).
2. The scorer: `clip` trained 150 steps on the clean world (seed 0), i.e. 9,600 clean pairs.
3. `graft data score` the pool with it; `graft data filter --keep top=F` for each F, and `random=0.3`.
4. `graft compare` of the `clip` recipe on each subset and on the whole pool at one FLOP budget
   (the same steps for every arm: same model), `--seeds` seeds, evaluated on the clean test split.
OUT/report.md holds the table (mean ± sd over seeds) with each filter's precision/recall against
the pool's truth; OUT/datacomp.png plots zero-shot and R@1 against the fraction kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from graft.cli import main  # noqa: E402

SUBSETS = {"top10": "top=0.1", "top30": "top=0.3", "top50": "top=0.5", "random30": "random=0.3"}
METRICS = ("zeroshot_acc", "i2t_r@1", "t2i_r@1")
KEPT = {"pool": 1.0, "top10": 0.1, "top30": 0.3, "top50": 0.5, "random30": 0.3}


def run(argv: list[str]) -> None:
    print("+ graft " + " ".join(shlex.quote(str(a)) for a in argv), flush=True)
    if main([str(a) for a in argv]) != 0:
        sys.exit(1)


def prepare(out: Path, pool: int) -> dict[str, dict]:
    """The pool, the scorer, the scores and the subsets; returns each subset's filter manifest."""
    if not (out / "pool").exists():
        run(["data", "export-noisy", "--out", out / "pool", "--n", pool])
    if not (out / "scorer" / "checkpoints").exists():
        run(["train", "clip", "--out", out / "scorer", "--set", "train.steps=150", "--set", "train.progress=false",
             "--set", "eval.splits=[test]"])
    run(["data", "score", out / "pool", "--with", out / "scorer", "--out", out / "scores"])  # resumes when done
    manifests = {}
    for name, rule in SUBSETS.items():
        if not (out / name).exists():
            run(["data", "filter", out / "pool", "--scores", out / "scores", "--keep", rule, "--out", out / name])
        manifests[name] = json.loads((out / name / "manifest.json").read_text())
    return manifests


def shards(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("*.tar"))
    return ",".join(str(folder / n) for n in names)


def summary(report: dict) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for row in report["rows"]:
        values = {}
        for name in METRICS:
            xs = [r["metrics"][name] for r in row["runs"] if name in r["metrics"]]
            if xs:
                values[name] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out[row["recipe"]] = values  # the arm's name
    return out


def plot(table: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for metric in METRICS[:2]:
        for arm in ("top10", "top30", "top50", "pool"):
            if arm in table and metric in table[arm]:
                m, sd = table[arm][metric]
                ax.errorbar(KEPT[arm], m, yerr=sd, fmt="o", color="C0" if metric == METRICS[0] else "C1", capsize=3)
        xs = [KEPT[a] for a in ("top10", "top30", "top50", "pool") if a in table]
        ax.plot(xs, [table[a][metric][0] for a in ("top10", "top30", "top50", "pool") if a in table],
                color="C0" if metric == METRICS[0] else "C1", label=f"{metric} (top fraction by CLIP score)")
        if "random30" in table:
            m, sd = table["random30"][metric]
            ax.errorbar(0.3, m, yerr=sd, fmt="x", color="C0" if metric == METRICS[0] else "C1", capsize=3,
                        label=f"{metric}, random 30 %")
    ax.set_xlabel("fraction of the noisy pool kept (same compute)")
    ax.set_ylabel("clean test split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_study() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/datacomp")
    p.add_argument("--pool", type=int, default=20000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=1.5e12)
    args = p.parse_args()
    out = Path(args.out)
    manifests = prepare(out, args.pool)
    arms = [f"pool=clip data.source=webdataset 'data.shards=[{shards(out / 'pool')}]'"]
    arms += [f"{name}=clip data.source=webdataset 'data.shards=[{shards(out / name)}]'" for name in SUBSETS]
    argv = ["compare", "--budget", args.budget, "--seeds", args.seeds, "--out", out / "compare",
            "--set", "train.progress=false", "--set", "eval.splits=[test]"]
    run([*argv, *(a for arm in arms for a in ("--arm", arm))])
    table = summary(json.loads((out / "compare" / "compare.json").read_text()))
    lines = ["| arm | kept | " + " | ".join(METRICS) + " | filter precision / recall vs truth |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for name, values in table.items():
        cells = [f"{values[m][0]:.3f} ± {values[m][1]:.3f}" if m in values else "—" for m in METRICS]
        truth = manifests.get(name, {}).get("truth")
        pr = f"{truth['precision']:.3f} / {truth['recall']:.3f}" if truth else "—"
        lines.append(f"| {name} | {KEPT[name]:.0%} | " + " | ".join(cells) + f" | {pr} |")
    plot(table, out / "datacomp.png")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {out / 'report.md'}, plot: {out / 'datacomp.png'}")


if __name__ == "__main__":
    main_study()
