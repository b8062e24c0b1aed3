"""What the torchrun tests share (test_parallel.py, test_compile.py): the environment, the `tiny`
run's arguments on one process and on two, launching torchrun (one run, or several in one launch
through tests/scripts/runs.py), and graft in this process (the one-process reference run,
`one_process`, is a fixture in conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from graft.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
QUIET = ["--set", "train.progress=false", "--set", "train.log_every=1", "--set", "eval.splits="]
SCRIPTS = Path(__file__).parent / "scripts"
RUNS = SCRIPTS / "runs.py"
STEPS = ["--set", "train.steps=5"]
# One process's 4 micro-batches of 8 are the two processes' 2 micro-batches of 8 each: gradient
# accumulation (DDP's no_sync, FSDP2's deferred reduce-scatter) is part of every comparison.
ONE = ["--set", "train.batch_size=32", "--set", "train.grad_accum=4"]
TWO = ["--set", "train.batch_size=16", "--set", "train.grad_accum=2"]
TINY = ["train", "tiny", *STEPS, *QUIET]


def torchrun(*args, nproc=2, extra=(), script=None):
    """`graft ARGS` (or `SCRIPT ARGS`) under torchrun on `nproc` processes."""
    target = [str(script)] if script else ["-m", "graft"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            *target, *args]


def torchrun_each(*runs):
    """Each argument list a `graft` run, all in one torchrun launch (tests/scripts/runs.py)."""
    joined = [arg for args in runs for arg in ("--", *args)][1:]
    return torchrun(*joined, script=RUNS)


def run(cmd, timeout=300, ok=True):
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=ENV)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def here(*args) -> None:
    """`graft ARGS` in this process: no interpreter start-up or imports to pay (about 6 s of a
    10-second tiny run), one thread as in the subprocesses. For one-process references compared
    with a tolerance; what must match bit for bit runs in a subprocess with the same environment."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)


def records(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def losses(path):
    return [r["loss"] for r in records(path) if r.get("event") != "eval"]
