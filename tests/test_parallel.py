"""The trainer on 2 processes (torchrun, gloo) under DDP and FSDP2 against one process, resharded
resumes, sharded evaluation, and faults: a rank killed, a NaN on one rank, a rank that hangs.

At the same global batch, 2 processes of batch B train like one process of batch 2B in 2
micro-batches (micro-batch m holds rank m's samples)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
QUIET = ["--set", "train.progress=false", "--set", "train.log_every=1", "--set", "eval.splits="]
SCRIPTS = Path(__file__).parent / "scripts"
DUAL = ["siglip", "--set", "vision.hidden_size=32", "--set", "vision.layers=1", "--set", "vision.intermediate_size=64",
        "--set", "text.hidden_size=32", "--set", "text.layers=1", "--set", "text.intermediate_size=64",
        "--set", "contrastive.embed_dim=16"]
CASES = {
    "vlm": ["tiny"],
    "dual": DUAL,
    "frozen_lora": ["tiny", "--set", "train.freeze=[vision]", "--set", "lm.lora_rank=4"],
}


def torchrun(*args, nproc=2, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            "-m", "graft", *args]


def single(*args):
    return [sys.executable, "-m", "graft", *args]


def run(cmd, timeout=300, ok=True):
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=ENV)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def losses(path):
    return [r["loss"] for r in records(path) if r.get("event") != "eval"]


@pytest.mark.parametrize("case", CASES)
def test_ddp_and_fsdp2_on_two_processes_equal_one_process(tmp_path, case):
    recipe, *sets = CASES[case]
    steps = ["--set", "train.steps=5", *QUIET, *sets]
    # a contrastive loss contrasts the whole global batch: one micro-batch of 32 on one process
    accum = 1 if case == "dual" else 2
    run(single("train", recipe, "--out", str(tmp_path / "one"), "--set", "train.batch_size=32",
               "--set", f"train.grad_accum={accum}", *steps))
    want = losses(tmp_path / "one")
    kinds = ["ddp", "fsdp2"] + (["fsdp2_ac"] if case == "frozen_lora" else [])
    for kind in kinds:
        extra = ["--set", "parallel.activation_checkpointing=true"] if kind == "fsdp2_ac" else []
        out = tmp_path / kind
        run(torchrun("train", recipe, "--out", str(out), "--set", "train.batch_size=16",
                     "--set", f"parallel.kind={kind.removesuffix('_ac')}", *steps, *extra))
        got = losses(out)
        assert len(got) == len(want) == 5
        assert got == pytest.approx(want, rel=1e-5), (kind, got, want)
    assert want[-1] < want[0]


def test_fsdp2_evaluation_is_sharded_and_equals_one_process(tmp_path):
    """Both processes evaluate half of the questions with the whole weights; the figures equal
    `graft eval` of the same checkpoint on one process."""
    out = tmp_path / "run"
    run(torchrun("train", "tiny", "--out", str(out), "--set", "parallel.kind=fsdp2", "--set", "train.steps=30",
                 "--set", "train.progress=false", "--set", "eval.vqa_per_type=5", "--set", "eval.captions=5",
                 "--set", "eval.splits=[test]"))
    sharded = json.loads((out / "eval.json").read_text())
    run(single("eval", str(out)))
    alone = json.loads((out / "eval.json").read_text())
    assert sharded == alone
    assert len((out / "eval_shapes_test.jsonl").read_text().splitlines()) == 6 * 5 + 5


def test_save_on_two_resume_on_one_and_back(tmp_path):
    """FSDP2 on 2 → one process → FSDP2 on 2: each resume reshards model and optimizer (checked
    tensor by tensor in tests/scripts/reshard.py) and says how the data continues."""
    out = tmp_path / "run"
    base = ["train", "tiny", "--out", str(out), "--set", "parallel.kind=fsdp2", *QUIET]
    run(torchrun(*base, "--set", "train.steps=6", "--set", "train.ckpt_every=3"))
    done = run(single(*base, "--set", "train.steps=9", "--set", "train.ckpt_every=3"))
    assert "saved on 2 processes, resumed on 1: the global batch is now 16 samples (was 32)" in done.stdout
    assert "training continues after sample 192" in done.stdout
    done = run(torchrun(*base, "--set", "train.steps=12", "--set", "train.ckpt_every=3"))
    assert "saved on 1 processes, resumed on 2" in done.stdout
    assert "training continues after sample 240" in done.stdout
    meta = json.loads((out / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert (meta["world_size"], meta["samples_seen"]) == (2, 240 + 3 * 32)
    assert [r["step"] for r in records(out) if r.get("event") != "eval"] == list(range(1, 13))
    script = [str(SCRIPTS / "reshard.py"), str(tmp_path / "states")]  # 1 → 2 → 1, tensor for tensor
    run([sys.executable, *script])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script])
    run([sys.executable, *script])


def test_killed_rank_then_the_same_command_matches_uninterrupted(tmp_path):
    """kill -9 of one of the two processes after a checkpoint: the run fails; the same command
    again resumes from the checkpoint, and the losses equal an uninterrupted run's."""
    args = ["train", "tiny", "--set", "parallel.kind=fsdp2", "--set", "train.steps=30", "--set", "train.ckpt_every=10",
            *QUIET, "--set", "parallel.timeout_s=20"]
    reference = tmp_path / "reference"
    run(torchrun(*args, "--out", str(reference)))
    out = tmp_path / "killed"
    cmd = torchrun(*args, "--out", str(out))
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_00000010").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    done = run(cmd)
    assert "resuming from" in done.stdout
    assert losses(out) == losses(reference)


def _children(pid: int) -> list[int]:
    """The worker processes torchrun started (children of its pid)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return sorted(found)


def test_nan_on_one_rank_is_skipped_on_both_then_stops(tmp_path):
    """Rank 1's images become NaN from step 4: every rank skips the step alike (no hang), counts
    it, and after 3 in a row the run stops with exit 1; the checkpoint of step 3 is intact."""
    out = tmp_path / "run"
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(SCRIPTS / "faults.py"), "nan", str(out)], ok=False)
    assert done.returncode != 0
    assert "training diverged: the 3 steps up to step 6 had non-finite gradients" in done.stderr
    rows = [r for r in records(out) if r.get("event") != "eval"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000003"]


def test_a_hanging_rank_fails_the_run_naming_it(tmp_path):
    """Rank 1 sleeps at step 3; within parallel.timeout_s rank 0 fails with a line naming the
    collective it waited in and the rank that did not answer."""
    t = time.time()
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(SCRIPTS / "faults.py"), "hang", str(tmp_path / "run")], ok=False, timeout=120)
    assert done.returncode != 0
    assert time.time() - t < 60
    line = [l for l in done.stderr.splitlines() if l.startswith("graft: rank 0 waited")]
    assert line and "rank 1" in line[0] and "parallel.timeout_s=5" in line[0], done.stderr[-3000:]
