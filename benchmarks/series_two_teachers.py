"""The two-teacher study on the built-in sensor world (docs/series.md): a small series VLM taught by two
teachers of different architecture at once — a patch transformer and a 1-D wide ResNet (WRN16-3) —
with teacher weights (alpha, 1 - alpha) and the soft/hard mix lambda, the study graft started from.

    python benchmarks/series_two_teachers.py [--out runs/series_two_teachers] [--seeds 3] [--budget 2e11]

Teachers: `sensors_vlm` with a 2 x 64 LM, one with the patch tower and one with WRN16-3, 300 steps
each, trained once (OUT/patch, OUT/wrn). The soft loss is the token-level logit distillation on
answer tokens (`distill_logits`, temperature 1), the hard one the student's next-token loss (`lm`),
mixed as lambda · soft + (1 - lambda) · hard with lambda = 0.99 (`distill.lambda`). Students, two
sizes: a one-layer patch tower with a 2 x 64 LM (`w64`) and with a 2 x 32 LM (`w32`). Arms per size:
no teacher; each teacher alone; both with alpha = 0.3, 0.5, 0.7 on the patch teacher. Every arm gets
the same student training FLOPs (the teachers' forwards are outside the budget), scored on the test
split's people, whom no model saw. Reports: OUT/<size>/report.md; re-running reuses runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from graft.cli import main

LAMBDA = 0.99
ALPHAS = (0.3, 0.5, 0.7)
SCORING = ["eval.vqa_per_type=100", "eval.captions=0", "train.progress=false", "train.batch_size=32"]
TEACHERS = {"patch": [], "wrn": ["series.tower=wrn", "series.wrn_width=3", "series.wrn_depth=16"]}
SIZES = {"w64": ["lm.hidden_size=64", "lm.intermediate_size=192"], "w32": ["lm.hidden_size=32", "lm.intermediate_size=96"]}


def run(argv: list[str]) -> None:
    print("+ graft " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(argv) != 0:
        sys.exit(1)


def sets(*settings: str) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def arms(patch: Path, wrn: Path) -> list[str]:
    soft = ["distill.losses=[logits]", f"distill.lambda={LAMBDA}"]
    specs = {"none": [], "patch_only": [f"distill.teachers=[{patch}]", *soft],
             "wrn_only": [f"distill.teachers=[{wrn}]", *soft]}
    for alpha in ALPHAS:
        entries = f"{{from: {patch}, weight: {alpha}}}, {{from: {wrn}, weight: {1 - alpha:.1f}}}"
        specs[f"alpha{alpha}"] = [f"distill.teachers=[{entries}]", *soft]
    return [a for name, s in specs.items() for a in ("--arm", " ".join(shlex.quote(w) for w in [f"{name}=sensors_vlm", *s]))]


def main_study() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/series_two_teachers")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=2e11, help="student training FLOPs per run")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    args = p.parse_args()
    out = Path(args.out)
    for name, extra in TEACHERS.items():
        if not (out / name / "report.md").is_file():
            run(["train", "sensors_vlm", "--out", str(out / name), *sets("lm.layers=2", *SIZES["w64"], "train.steps=300",
                                                                          *SCORING, *extra)])
    for size in args.sizes:
        common = sets("lm.layers=2", "series.layers=1", *SIZES[size], *SCORING)
        run(["compare", *arms(out / "patch", out / "wrn"), "--budget", str(args.budget), "--seeds", str(args.seeds),
             *common, "--out", str(out / size)])


if __name__ == "__main__":
    main_study()
