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
    # experts balanced by a bias that moves after each step with the loads of every process
    "moe_bias": ["tiny", "--set", "lm.moe_experts=4", "--set", "lm.moe_balance=bias", "--set", "lm.moe_bias_rate=0.05"],
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


def test_kill_9_sigterm_and_max_restarts_resume_exactly(tmp_path):
    """Against an uninterrupted 2-process FSDP2 run: (1) kill -9 of one of the two processes after a
    checkpoint fails the run, and the same command again resumes from it; (2) SIGTERM to torchrun
    (as Slurm sends it) makes both processes finish the step, save it (asynchronously, train.async_save)
    and exit 143, and the same command resumes; (3) under `torchrun --max-restarts=1`, kill -9 of one
    process restarts both, and they resume by themselves. All log exactly the uninterrupted losses."""
    args = ["train", "tiny", "--set", "parallel.kind=fsdp2", "--set", "train.steps=30", "--set", "train.ckpt_every=10",
            *QUIET, "--set", "parallel.timeout_s=20"]
    reference = tmp_path / "reference"
    run(torchrun(*args, "--out", str(reference)))
    for fault in ("kill", "sigterm", "restart"):
        out = tmp_path / fault
        cmd = torchrun(*args, "--out", str(out), *(["--set", "train.async_save=true"] if fault == "sigterm" else []),
                       extra=["--max-restarts=1"] if fault == "restart" else [])
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            deadline = time.time() + 120
            while not (out / "checkpoints" / "step_00000010").is_dir() and time.time() < deadline:
                time.sleep(0.05)
            workers = _children(proc.pid)
            assert len(workers) == 2, workers
            if fault == "sigterm":
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.kill(workers[-1], signal.SIGKILL)
            _, err = proc.communicate(timeout=120)
        finally:  # never leave a stray torchrun behind a failed test
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if fault == "restart":
            assert proc.returncode == 0, err[-3000:]
            assert losses(out) == losses(reference), fault
            continue
        assert proc.returncode != 0
        if fault == "sigterm":
            assert "graft: stopped by SIGTERM after step" in err, err[-3000:]
        done = run(cmd)
        assert "resuming from" in done.stdout
        assert losses(out) == losses(reference), fault


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


def test_kill_9_during_a_checkpoint_write_resumes_from_the_one_before(tmp_path):
    """Rank 1 dies while the checkpoint of step 6 is being written: the run fails, step 3's
    checkpoint is the latest complete one, and the same command resumes from it to the
    uninterrupted run's losses."""
    faults = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPTS / "faults.py")]
    run([*faults, "none", str(tmp_path / "reference")])
    out = tmp_path / "run"
    assert run([*faults, "ckptkill", str(out)], ok=False).returncode != 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [".tmp-step_00000006", "step_00000003"]
    done = run([*faults, "none", str(out)])
    assert f"resuming from {out / 'checkpoints' / 'step_00000003'}" in done.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert losses(out) == losses(tmp_path / "reference")


def test_a_hanging_rank_fails_the_run_naming_it(tmp_path):
    """Rank 1 sleeps at step 3; within parallel.timeout_s rank 0 fails with a line naming the
    collective it waited in and the rank that did not answer."""
    t = time.time()
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(SCRIPTS / "faults.py"), "hang", str(tmp_path / "run")], ok=False, timeout=120)
    assert done.returncode != 0
    assert time.time() - t < 60
    line = [l for l in done.stderr.splitlines() if l.startswith("graft: rank 0 waited")]
    assert line and "rank 1" in line[0] and "parallel.timeout_s=3" in line[0], done.stderr[-3000:]


COUNT_GRAPHS = ("import sys, torch; from graft.cli import main; code = main(sys.argv[1:]); "
                "from torch._dynamo.utils import counters; "
                "print('graphs', counters['stats']['unique_graphs'], 'breaks', sum(counters['graph_break'].values())); "
                "sys.exit(code)")


def test_compile_traces_the_whole_forward_and_trains_like_eager(tmp_path):
    """parallel.compile=true on one process: the whole training forward (vision, image scatter,
    decoder, LM head at the answers, loss) compiles without a graph break, and the losses follow
    the eager run's."""
    args = ["train", "tiny", "--set", "train.steps=4", *QUIET]
    compiled = run([sys.executable, "-c", COUNT_GRAPHS, *args, "--out", str(tmp_path / "c"),
                    "--set", "parallel.compile=true"])
    counts = compiled.stdout.split("graphs")[-1].split()
    assert int(counts[0]) >= 1 and counts[1:] == ["breaks", "0"], compiled.stdout[-2000:]
    run(single(*args, "--out", str(tmp_path / "e")))
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "e"), rel=1e-4)


def test_compiled_on_two_processes_trains_like_one_eager_process(tmp_path):
    """torch.compile under DDP (the compiled DDP wrapper, with gradient accumulation through
    no_sync) and under FSDP2 (each block compiled): the same losses as one eager process."""
    args = ["train", "tiny", "--set", "train.steps=4", *QUIET]
    run(single(*args, "--out", str(tmp_path / "one"), "--set", "train.batch_size=32", "--set", "train.grad_accum=4"))
    for kind in ("ddp", "fsdp2"):
        run(torchrun(*args, "--out", str(tmp_path / kind), "--set", f"parallel.kind={kind}",
                     "--set", "parallel.compile=true", "--set", "train.batch_size=16", "--set", "train.grad_accum=2"))
        assert losses(tmp_path / kind) == pytest.approx(losses(tmp_path / "one"), rel=1e-4), kind


def test_two_nodes_by_c10d_rendezvous_train_like_one_process(tmp_path):
    """Two torchrun agents meeting through a c10d rendezvous (as on 2 nodes; here both on localhost,
    one process each), FSDP2: the same losses as one process with the same global batch."""
    args = ["train", "tiny", "--set", "train.steps=5", *QUIET]
    run(single(*args, "--out", str(tmp_path / "one"), "--set", "train.batch_size=32", "--set", "train.grad_accum=2"))
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:29533", f"--rdzv-id={tmp_path.name}", "-m", "graft", *args,
            "--out", str(tmp_path / "nodes"), "--set", "parallel.kind=fsdp2", "--set", "train.batch_size=16"]
    agents = [subprocess.Popen(node, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert losses(tmp_path / "nodes") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
