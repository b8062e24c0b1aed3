"""CoCa against contrastive-only and captioning-only at matched training FLOPs (Yu et al. 2022;
docs/contrastive.md#coca), on the built-in world, scored on zero-shot, retrieval and captioning together.

    python benchmarks/coca_study.py [--out runs/coca_study] [--seeds 3] [--budget 4e12]

Three arms through `graft compare` (each run trains floor(budget / its measured FLOPs per step)
steps): `contrastive` = the `clip` recipe (CoCa without its decoder, so ~1.9x the steps of a CoCa
run), `coca` = the `coca` recipe (itc 1, caption 2), `captioner` = the same model trained on the
captioning loss alone (itc 0, caption 1). Everything lands in OUT/report.md; OUT/coca_study.png
plots each metric's mean ± sd over seeds. Re-running reuses finished runs.
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

ARMS = ["contrastive=clip", "coca=coca", "captioner=coca 'train.objectives={itc: 0, caption: 1}'"]
METRICS = ("zeroshot_acc", "i2t_r@1", "t2i_r@1", "caption_exact")  # caption_cider on its own axis


def run(argv: list[str]) -> None:
    print("+ graft " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(argv) != 0:
        sys.exit(1)


def summary(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """arm → metric → (mean, sd) over its seeds (sd 0 with one seed)."""
    out = {}
    for row in rows:
        values = {}
        for name in (*METRICS, "caption_cider"):
            xs = [r["metrics"][name] for r in row["runs"] if name in r["metrics"]]
            if xs:
                values[name] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out[row["recipe"]] = values
    return out


def plot(table: dict, path: Path, budget: float, seeds: int) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    arms, width = list(table), 0.8 / len(table)
    for i, arm in enumerate(arms):
        xs = [m + i * width for m in range(len(METRICS))]
        means = [table[arm].get(m, (0.0, 0.0))[0] for m in METRICS]
        sds = [table[arm].get(m, (0.0, 0.0))[1] for m in METRICS]
        left.bar(xs, means, width, yerr=sds, capsize=3, label=arm)
        cider = table[arm].get("caption_cider")
        if cider:
            right.bar(i, cider[0], 0.6, yerr=cider[1], capsize=3, color=f"C{i}")
    left.set_xticks([m + width * (len(arms) - 1) / 2 for m in range(len(METRICS))], METRICS)
    left.set_ylim(0, 1.05)
    left.set_title(f"test split, {budget:.0e} training FLOPs per run, mean ± sd over {seeds} seeds", fontsize=9)
    left.legend(fontsize=8)
    right.set_xticks(range(len(arms)), arms, fontsize=8)
    right.set_title("caption CIDEr-D", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_study() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/coca_study")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=4e12, help="training FLOPs per run (~200 CoCa steps)")
    args = p.parse_args()
    out = Path(args.out)
    arms = [a for spec in ARMS for a in ("--arm", spec)]
    common = [a for s in ("train.progress=false", "eval.splits=[test]", "eval.captions=100") for a in ("--set", s)]
    run(["compare", *arms, "--budget", str(args.budget), "--seeds", str(args.seeds), *common, "--out", str(out)])
    table = summary(json.loads((out / "compare.json").read_text())["rows"])
    plot(table, out / "coca_study.png", args.budget, args.seeds)
    for arm, values in table.items():
        print(arm, "  ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in values.items()))
    print(f"plot: {out / 'coca_study.png'}")


if __name__ == "__main__":
    main_study()
