"""The two-teacher study on the built-in world (docs/distill.md): a small CLIP student taught by a
CLIP and a SigLIP teacher at once, teacher weights (alpha, 1 - alpha), soft/hard mix lambda.

    python benchmarks/two_teachers.py [--out runs/two_teachers] [--seeds 3] [--budget 5e11] [--sizes w64 w32] [--live]

Teachers: the `clip` and `siglip` recipes as they are (towers of width 128), trained once. The
soft loss is open_clip's logit distillation (`distill_kd`: the soft cross-entropy against each
teacher's softmax at its own logit scale), the hard one the student's own contrastive loss (`itc`),
mixed as lambda · soft + (1 - lambda) · hard with lambda = 0.99. Arms, for each of two student
sizes (widths 64 and 32): no teacher; the CLIP teacher alone; the SigLIP teacher alone; both with
alpha = 0.3, 0.5, 0.7 on the CLIP teacher. Every arm gets the same student training FLOPs (the
teachers' forwards are outside the budget). The teachers' outputs over the records the arms read are
computed once (`graft distill precompute`, OUT/teacher_outputs) and every taught arm reads them;
`--live` runs the teachers in every arm instead (same losses, tested). Reports: OUT/<size>/report.md;
re-running reuses runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from graft.cli import main

SIZES = {"w64": 64, "w32": 32}
LAMBDA = 0.99
ALPHAS = (0.3, 0.5, 0.7)


def student(width: int) -> list[str]:
    return [f"vision.hidden_size={width}", "vision.layers=2", f"vision.intermediate_size={4 * width}",
            f"text.hidden_size={width}", "text.layers=1", f"text.intermediate_size={4 * width}",
            f"contrastive.embed_dim={width}"]


def run(argv: list[str]) -> None:
    print("+ graft " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(argv) != 0:
        sys.exit(1)


def arms(clip: Path, siglip: Path, store: Path | None = None) -> list[str]:
    soft = ["distill.losses=[kd]", f"distill.lambda={LAMBDA}", *([f"distill.precomputed={store}"] if store else [])]
    specs = {"none": [], "clip_only": [f"distill.teachers=[{clip}]", *soft],
             "siglip_only": [f"distill.teachers=[{siglip}]", *soft]}
    for alpha in ALPHAS:
        entries = f"{{from: {clip}, weight: {alpha}}}, {{from: {siglip}, weight: {1 - alpha:.1f}}}"
        specs[f"alpha{alpha}"] = [f"distill.teachers=[{entries}]", *soft]
    out = []
    for name, sets in specs.items():
        out += ["--arm", " ".join(shlex.quote(w) for w in [f"{name}=clip", *sets])]
    return out


def main_study() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/two_teachers")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=5e11, help="student training FLOPs per run")
    p.add_argument("--clip", help="an existing clip teacher run (default: OUT/clip, trained if missing)")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES), help="student sizes (default both)")
    p.add_argument("--live", action="store_true", help="run the teachers in every arm instead of reading their "
                   "outputs precomputed once (graft distill precompute)")
    args = p.parse_args()
    out = Path(args.out)
    teachers = {"clip": Path(args.clip) if args.clip else out / "clip", "siglip": out / "siglip"}
    for recipe, path in teachers.items():
        if not (path / "report.md").is_file():
            run(["train", recipe, "--out", str(path), "--set", "train.progress=false"])
    store = None if args.live else precompute(out / "teacher_outputs", teachers, args.budget)
    for size in args.sizes:
        common = [a for s in [*student(SIZES[size]), "train.progress=false"] for a in ("--set", s)]
        run(["compare", *arms(teachers["clip"], teachers["siglip"], store), "--budget", str(args.budget),
             "--seeds", str(args.seeds), *common, "--out", str(out / size)])


def precompute(store: Path, teachers: dict, budget: float) -> Path:
    """Both teachers' outputs over the records of the longest arm (the smallest student without a
    teacher), once for every arm, seed and size: each arm reads them instead of running the teachers."""
    from graft.compare import measure
    from graft.recipes import recipe

    steps = max(int(budget // measure(recipe("clip", student(w)))["flops_per_step"]) for w in SIZES.values())
    if not (store / "manifest.json").is_file():
        entries = f"{{from: {teachers['clip']}, weight: 0.5}}, {{from: {teachers['siglip']}, weight: 0.5}}"
        sets = [f"distill.teachers=[{entries}]", "distill.losses=[kd]", f"train.steps={steps}"]
        run(["distill", "precompute", "clip", *(a for s in sets for a in ("--set", s)), "--out", str(store)])
    return store


if __name__ == "__main__":
    main_study()
