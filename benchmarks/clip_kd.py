"""The CLIP-KD study on the built-in world (Yang et al. 2024; docs/distill.md): a small CLIP student
taught by a larger CLIP teacher, at matched student training FLOPs, one arm per loss.

    python benchmarks/clip_kd.py [--out runs/clip_kd] [--seeds 3] [--budget 5e11]

Trains the teacher (the `clip` recipe as it is: vision and text towers of width 128, 1,500 steps)
once, then runs `graft compare` with five arms of the same student (widths 64, one text layer,
embeddings of 64, so fd and icl learn a projection to the teacher's 128): no teacher, fd, icl,
crd, and all three. The budget counts the student's training FLOPs only (the teacher's forward is
reported apart). Everything lands in OUT/compare/report.md; re-running reuses finished runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from graft.cli import main

STUDENT = ["vision.hidden_size=64", "vision.layers=2", "vision.intermediate_size=256", "text.hidden_size=64",
           "text.layers=1", "text.intermediate_size=256", "contrastive.embed_dim=64"]
ARMS = {"baseline": [], "fd": ["distill.losses=[fd]"], "icl": ["distill.losses=[icl]"],
        "crd": ["distill.losses=[crd]"], "all": ["distill.losses=[fd,icl,crd]"]}


def run(argv: list[str]) -> None:
    print("+ graft " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if main(argv) != 0:
        sys.exit(1)


def main_study() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/clip_kd")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=float, default=5e11, help="student training FLOPs per run (~300 steps)")
    args = p.parse_args()
    out = Path(args.out)
    teacher = out / "teacher"
    if not (teacher / "report.md").is_file():  # trained once; `graft train` resumes an interrupted one
        run(["train", "clip", "--out", str(teacher), "--set", "train.progress=false"])
    arms = []
    for name, sets in ARMS.items():
        taught = [f"distill.teachers=[{teacher}]", *sets] if sets else []
        arms += ["--arm", " ".join([f"{name}=clip", *taught])]
    common = [a for s in [*STUDENT, "train.progress=false"] for a in ("--set", s)]
    run(["compare", *arms, "--budget", str(args.budget), "--seeds", str(args.seeds), *common,
         "--out", str(out / "compare")])


if __name__ == "__main__":
    main_study()
