"""The whole trainer under torchrun (2 processes, gloo): DDP with batch B per rank must train exactly
like one process with batch 2B in 2 micro-batches, whose micro-batch m holds rank m's samples."""

import json
import os
import subprocess
import sys

import pytest

STEPS = ["--set", "train.steps=20", "--set", "train.log_every=5", "--set", "train.ckpt_every=10",
         "--set", "train.progress=false", "--set", "eval.vqa_per_type=2", "--set", "eval.captions=2"]


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") != "eval"]


def test_ddp_on_two_processes_equals_grad_accumulation_on_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "graft", "train", "tiny", "--out", str(ddp), "--set", "train.batch_size=16", *STEPS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cmd = [sys.executable, "-m", "graft", "train", "tiny", "--out", str(single), "--set", "train.batch_size=32",
           "--set", "train.grad_accum=2", *STEPS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]

    got, want = losses(ddp), losses(single)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    assert got[-1] < got[0]
    # only rank 0 writes: one set of checkpoints, one metrics file, eval.json
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    assert (ddp / "eval.json").is_file()
