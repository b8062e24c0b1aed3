"""Warmup-stable-decay sweeps (Hägele et al. 2024): `graft scale sweep ... --set optim.schedule=wsd`.

Under WSD a run of T steps holds its learning rate constant until its decay starts at
`wsd_decay_start(T)` (graft/trainer/optim.py), then decays over the rest. A longer run of the same
size and seed has read the same records with the same learning rate up to that step, so its
checkpoint there is the shorter run's state at that step: resumed with train.steps = T, it finishes
as the shorter run would have from scratch (tested bit for bit). The sweep therefore trains each
size and seed once, to its longest budget, keeping the checkpoints at every shorter budget's decay
start (`train.keep_steps`), and each shorter budget's run is a branch: a new run directory holding
that checkpoint, the longer run's config, tokenizer and log up to that step, trained on with its
own `train.steps`. A size then costs its longest run plus the decays of the others instead of every
run in full. Each point keeps the FLOPs, tokens and steps of its own run, as if trained alone.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from graft.trainer.checkpoint import step_dir
from graft.trainer.optim import wsd_decay_start

COPIED = ("config.yaml", "tokenizer.json", "hf_tokenizer", "metrics.jsonl")  # what a branch takes from its parent


def link(runs: list, warmup: int, fraction: float, startup_s: float) -> list:
    """The runs with each one shorter than its (size, seed)'s longest made a branch of it: its parent's
    name and the step it starts from, its estimated time only its own steps'; the longest keeps the
    checkpoints of those steps."""
    longest = {}
    for r in runs:
        key = (r.size.name, r.seed)
        if key not in longest or r.steps > longest[key].steps:
            longest[key] = r
    starts = {}
    linked = []
    for r in runs:
        parent = longest[(r.size.name, r.seed)]
        if r is parent:
            linked.append(r)
            continue
        start = wsd_decay_start(r.steps, warmup, fraction)
        starts.setdefault(parent.name, set()).add(start)
        own = startup_s + (r.est_s - startup_s) * (r.steps - start) / r.steps
        linked.append(replace(r, parent=parent.name, start=start, est_s=own))
    return [replace(r, keep=tuple(sorted(starts[r.name]))) if r.name in starts else r for r in linked]


def branch(parent: Path, start: int, out: Path) -> None:
    """Make `out` a run that resumes `parent`'s checkpoint at step `start` (nothing done if `out` exists:
    a branch made before resumes or is reused like any run)."""
    if out.exists():
        return
    ckpt = step_dir(parent / "checkpoints", start)
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{parent} holds no complete checkpoint at step {start} (train.keep_steps)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    for name in COPIED:
        src = parent / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    shutil.copytree(ckpt, tmp / "checkpoints" / ckpt.name)
    tmp.rename(out)
