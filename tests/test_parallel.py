"""The trainer on 2 processes (torchrun, gloo) under DDP and FSDP2 against one process, resharded
resumes, sharded evaluation, and faults: a signal, a rank killed mid-step or mid-checkpoint, a NaN
on one rank, a rank that hangs.

At the same global batch, 2 processes of batch B train like one process of batch 2B in twice the
micro-batches (data/stream.py first_sample: micro-batch m of rank r holds the samples that one
process sees in its micro-batch r * grad_accum + m). Most tests compare against runs trained once
per session (`shared_run`): `tiny` for 5 steps on one process, and every two-process run the
comparisons need, in one torchrun launch (the start-up of torch in three processes, not the
training, is most of a launch's time).

Tolerances. One process and two sum the same gradients in another order (each rank's gradient is
all-reduced instead of accumulated in one buffer), so their fp32 losses differ in the last bits
from step 2 on: at most 7e-8 relative over these 5 steps, measured on an Intel Xeon (DDP, FSDP2,
each case below); rel=1e-5 leaves room for other CPUs' kernels. Dropping one rank's share of the
gradient (micro-batches 2-3 of the one-process run, measured) moves step 2's loss by 9e-4 relative
and step 5's by 4e-3: a hundred times that bound (compiled runs, test_compile.py: rel=1e-4).
Runs with the same processes and reduction order (a run and its resumption, standalone and c10d)
are compared exactly."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from graft.cli import main
from tests.hf_models import make_vision
from tests.helpers import copy_run, wait_for
from tests.torchrun_runs import (ENV, ONE, QUIET, SCRIPTS, STEPS, TINY, TWO, here, losses, records, run, torchrun,
                                 torchrun_each)

pytestmark = pytest.mark.slow  # every test here starts processes (torchrun): CI runs them, the edit loop skips them

FAULTS = SCRIPTS / "faults.py"
FSDP2 = ["--set", "parallel.kind=fsdp2"]
DUAL = ["siglip", "--set", "vision.hidden_size=32", "--set", "vision.layers=1", "--set", "vision.intermediate_size=64",
        "--set", "text.hidden_size=32", "--set", "text.layers=1", "--set", "text.intermediate_size=64",
        "--set", "contrastive.embed_dim=16"]


def faults(fault, step, *args, marker=None):
    """The arguments of FAULTS: graft's CLI running ARGS with FAULT injected at STEP."""
    return [fault, str(step), *([str(marker)] if marker else []), "--", *args]


CASES = {
    "dual": DUAL,
    # frozen parts, LoRA adapters and MoE experts balanced by a bias that moves after each step with
    # the loads of every process; under FSDP2 with activation checkpointing as well
    "frozen_lora_moe": ["tiny", "--set", "train.freeze=[vision]", "--set", "lm.lora_rank=4",
                        "--set", "lm.moe_experts=4", "--set", "lm.moe_balance=bias", "--set", "lm.moe_bias_rate=0.05"],
    # EVE: a frozen teacher the trainer holds outside the model and its DDP / FSDP2 wrapping, and
    # the objective `align` over the model's outputs and the teacher's (TEACHER: a SigLIP folder)
    "eve": ["shapes_fuyu", "--set", "lm.hidden_size=32", "--set", "lm.layers=2", "--set", "lm.intermediate_size=64",
            "--set", "eve.teacher=EVE_TEACHER", "--set", "train.objectives={lm: 1, align: 2}"],
    # CLIP-KD: a student taught by a frozen CLIP run, its four distillation losses over the global
    # batch (KD_TEACHER: a 2-step run of the same small CLIP, trained before the launch)
    "distill": ["clip", *DUAL[1:], "--set", "distill.teachers=[KD_TEACHER]", "--set", "distill.losses=[fd,icl,crd,kd]"],
}
# the same student reading its teacher's outputs from a store (KD_STORE: `graft distill precompute` of
# the one-process run's records, before the launch): each process looks its own rows up
CASES["distill_stored"] = [*CASES["distill"], "--set", "distill.precomputed=KD_STORE"]
# a contrastive loss contrasts each micro-batch of the global batch: one of 32 on one process, one
# of 16 per process (gathered) on two
BATCHES = {case: (["--set", "train.batch_size=32"], ["--set", "train.batch_size=16"])
           for case in ("dual", "distill", "distill_stored")}


def _sets(case, out):
    """The case's recipe and settings, its teacher in `out`."""
    return [arg.replace("EVE_TEACHER", str(out / "teacher")).replace("KD_TEACHER", str(out / "kd_teacher"))
            .replace("KD_STORE", str(out / "kd_store")) for arg in CASES[case]]


def _case_runs(out, case):
    recipe, *sets = _sets(case, out)
    two = BATCHES.get(case, (ONE, TWO))[1]
    kinds = {"ddp": [], "fsdp2": ["--set", "parallel.activation_checkpointing=true"] if case != "dual" else []}
    return [["train", recipe, *STEPS, *QUIET, *sets, "--out", str(out / f"{case}_{kind}"), *two,
             "--set", f"parallel.kind={kind}", *extra] for kind, extra in kinds.items()]


def _two(out):
    """Every two-process run the comparisons read, in one torchrun launch (tests/scripts/runs.py)."""
    evaluate = ["--set", "eval.splits=[test]", "--set", "eval.vqa_per_type=5", "--set", "eval.captions=5"]
    make_vision("siglip", out / "teacher")
    here("train", "clip", *DUAL[1:], "--set", "train.steps=2", *QUIET, "--out", str(out / "kd_teacher"))
    here("distill", "precompute", *_sets("distill", out), *STEPS, *QUIET, *BATCHES["distill"][0],
         "--out", str(out / "kd_store"))
    run(torchrun_each([*TINY, "--out", str(out / "fsdp2"), *TWO, *FSDP2, *evaluate],
                      [*TINY, "--out", str(out / "ddp"), *TWO, "--set", "parallel.kind=ddp"],
                      *(args for case in CASES for args in _case_runs(out, case))))


@pytest.fixture
def two(shared_run):
    """The two-process runs: `fsdp2` and `ddp` (the global batches of `one_process` under FSDP2 and
    DDP; `fsdp2` then evaluates 5 questions per type and 5 captions with the evaluation sharded, and
    its checkpoint of step 5 is where the resharding and fault tests start), and `<case>_<kind>`
    for each of CASES under DDP and FSDP2."""
    return shared_run("two_processes", _two)


@pytest.fixture
def fsdp2_two(two):
    """`tiny` under FSDP2 on two processes, 5 steps, checkpoint of step 5 (see `two`)."""
    return two / "fsdp2"


def two_processes(out, *sets):
    """The `fsdp2_two` run's command for another run directory (with SETS): any change is one
    that leaves the losses alone (checkpointing, timeouts), so its losses must equal that run's."""
    return [*TINY, "--out", str(out), *TWO, *FSDP2, *sets]


def test_ddp_and_fsdp2_on_two_processes_equal_one_process(one_process, two):
    """`tiny` under DDP and under FSDP2 on two processes: the losses of one process (to fp32
    reassociation, see the module's docstring), step by step; and they go down."""
    want = losses(one_process)
    for got in (losses(two / "ddp"), losses(two / "fsdp2")):
        assert len(got) == len(want) == 5
        assert got == pytest.approx(want, rel=1e-5), (got, want)
    assert want[-1] < want[0]


def named(out, name: str) -> list[float]:
    """A run's logged values of the named loss `name`, step by step."""
    return [r[f"loss/{name}"] for r in records(out) if "loss" in r]


@pytest.mark.parametrize("case", CASES)
def test_other_models_on_two_processes_equal_one_process(tmp_path, two, case):
    """A dual encoder (its contrastive loss over the global batch), a VLM with frozen parts, LoRA
    and bias-balanced MoE, Fuyu with EVE's teacher, and a CLIP student distilled from a CLIP
    teacher: under DDP and FSDP2 (the latter with activation checkpointing) the losses of one
    process, to fp32 reassociation (every named loss for the distillation)."""
    recipe, *sets = _sets(case, two)
    here("train", recipe, *STEPS, *QUIET, *sets, "--out", str(tmp_path / "one"), *BATCHES.get(case, (ONE, TWO))[0])
    want = losses(tmp_path / "one")
    for kind in ("ddp", "fsdp2"):
        got = losses(two / f"{case}_{kind}")
        assert len(got) == len(want) == 5
        assert got == pytest.approx(want, rel=1e-5), (kind, got, want)
        for name in ("distill_fd", "distill_icl", "distill_crd", "distill_kd") if case.startswith("distill") else ():
            mine, one = named(two / f"{case}_{kind}", name), named(tmp_path / "one", name)
            assert mine == pytest.approx(one, rel=1e-5), (kind, name, mine, one)
    assert want[-1] < want[0]


def test_fsdp2_evaluation_is_sharded_and_equals_one_process(tmp_path, fsdp2_two):
    """Both processes evaluate half of the questions with the whole weights; the figures and every
    prediction, in order, equal `graft eval` of the same checkpoint on one process."""
    out = copy_run(fsdp2_two, tmp_path / "run")
    predictions = out / "eval_shapes_test.jsonl"
    sharded, sharded_predictions = json.loads((out / "eval.json").read_text()), predictions.read_text()
    (out / "eval.json").unlink(), predictions.unlink()  # so that what is compared is written anew
    here("eval", str(out))
    assert json.loads((out / "eval.json").read_text()) == sharded
    assert predictions.read_text() == sharded_predictions
    assert len(sharded_predictions.splitlines()) == 6 * 5 + 5


def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path, one_process, fsdp2_two, capsys):
    """FSDP2 on 2 → one process → FSDP2 on 2, each at the run's global batch of 32 samples in
    micro-batches of 8 (16 per process in 2 on two, 32 in 4 on one): each resume reshards model and
    optimizer (checked tensor by tensor in tests/scripts/reshard.py) and says so, and the 9 losses
    follow one process's resumed at the same steps to fp32 reassociation (module docstring; a
    halved global batch moves them a hundred times more)."""
    out = copy_run(fsdp2_two, tmp_path / "run")  # 5 steps of 32 samples, checkpoint of step 5
    on_one = [*TINY, "--out", str(out), *ONE, *FSDP2]  # FSDP2 over this one process
    here(*on_one, "--set", "train.steps=7")
    said = capsys.readouterr().out
    assert ("saved on 2 processes, resumed on 1: the same global batch of 32 samples (32 per process in 4 "
            "micro-batches)") in said and "training continues after sample 160" in said, said
    done = run(torchrun(*two_processes(out, "--set", "train.steps=9")))
    assert ("saved on 1 processes, resumed on 2: the same global batch of 32 samples (16 per process in 2 "
            "micro-batches)") in done.stdout and "training continues after sample 224" in done.stdout
    meta = json.loads((out / "checkpoints" / "step_00000009" / "meta.json").read_text())
    assert (meta["world_size"], meta["samples_seen"], meta["global_batch"]) == (2, 9 * 32, 32)
    assert [r["step"] for r in records(out) if r.get("event") != "eval"] == list(range(1, 10))
    ref = copy_run(one_process, tmp_path / "ref")  # the same schedule (train.steps 5, 7, 9) on one process
    for steps in (7, 9):
        here(*TINY, "--out", str(ref), *ONE, "--set", f"train.steps={steps}")
    assert losses(out) == pytest.approx(losses(ref), rel=1e-5)
    done = run(torchrun(str(tmp_path / "states"), script=SCRIPTS / "reshard.py"))  # 1 → 2 → 1
    assert "resharded exactly: one" in done.stdout and "resharded exactly: two" in done.stdout, done.stdout[-3000:]


def test_resume_on_fewer_processes_says_how_to_keep_the_global_batch(tmp_path, fsdp2_two, capsys):
    """The same command on one process halves the global batch, and says which settings keep it; a
    per-process batch that keeps neither the settings nor the global batch is refused in one line."""
    out = copy_run(fsdp2_two, tmp_path / "run")
    assert main([*TINY, "--out", str(out), *FSDP2, "--set", "train.batch_size=24", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run with train.batch_size=16, not 24" in err[0], err
    here(*two_processes(out, "--set", "train.steps=6"))
    said = capsys.readouterr().out
    assert ("saved on 2 processes, resumed on 1: the global batch is now 16 samples (was 32); to keep it: "
            "--set train.batch_size=32 --set train.grad_accum=4") in said, said


def start(cmd, out):
    """A torchrun in its own process group (so that a failed test can kill all of it), its output
    in files (a pipe nobody reads could fill and block it)."""
    log = open(out.parent / f"{out.name}.log", "w+")
    return subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True), log


def finish(proc, log, timeout=180):
    try:
        proc.wait(timeout=timeout)
    finally:  # never leave a stray torchrun behind a failed test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with log:
        log.seek(0)
        return log.read()


def test_sigterm_finishes_the_step_checkpoints_it_and_the_same_command_resumes_exactly(tmp_path, fsdp2_two):
    """SIGTERM to torchrun (as Slurm sends it) while both processes are inside step 4: both finish
    that step, save it (asynchronously, train.async_save; train.ckpt_every=3 would not have), say
    so and exit; the same command resumes from it to exactly the uninterrupted run's losses."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = two_processes(out, "--set", "train.ckpt_every=3", "--set", "train.async_save=true",
                         "--set", "parallel.timeout_s=60")
    proc, log = start(torchrun(*faults("pause", 4, *args, marker=marker), script=FAULTS), out)
    try:
        wait_for([tmp_path / "paused.rank0", tmp_path / "paused.rank1"], proc)
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        output = finish(proc, log)
    assert proc.returncode != 0, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("graft: stopped")]
    checkpoint = out / "checkpoints" / "step_00000004"
    assert stopped == [f"graft: stopped by SIGTERM after step 4 of 5; checkpoint {checkpoint} saved. "
                       "The same command resumes from it."] * 2, output[-3000:]  # each process's line
    done = run(torchrun(*args))
    assert f"resuming from {checkpoint}" in done.stdout
    assert losses(out) == losses(fsdp2_two)


def test_kill_9_of_one_process_under_max_restarts_resumes_exactly(tmp_path, fsdp2_two):
    """Under `torchrun --max-restarts=1`, kill -9 of rank 1 inside step 5 restarts both processes;
    they resume from the checkpoint of step 3 by themselves and log exactly the uninterrupted
    losses (step 4, logged before the kill, once)."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = two_processes(out, "--set", "train.ckpt_every=3", "--set", "parallel.timeout_s=60")
    restarting = torchrun(*faults("pause", 5, *args, marker=marker), script=FAULTS, extra=["--max-restarts=1"])
    proc, log = start(restarting, out)
    try:
        wait_for([tmp_path / "paused.rank0", tmp_path / "paused.rank1"], proc)
        assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
        os.kill(int((tmp_path / "paused.rank1").read_text()), signal.SIGKILL)
    finally:
        output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step_00000003'}" in output, output[-3000:]
    assert losses(out) == losses(fsdp2_two)


def test_kill_9_during_a_checkpoint_write_resumes_from_the_one_before(tmp_path, fsdp2_two):
    """Rank 1 dies (SIGKILL) while the checkpoint of step 4 is being written: the run fails, rank 0
    does not wait for it forever, step 2's checkpoint is the latest complete one, and the same
    command resumes from it to exactly the uninterrupted run's losses."""
    out = tmp_path / "run"
    args = two_processes(out, "--set", "train.ckpt_every=2", "--set", "parallel.timeout_s=60")
    assert run(torchrun(*faults("ckptkill", 4, *args), script=FAULTS), ok=False).returncode != 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [".tmp-step_00000004", "step_00000002"]
    done = run(torchrun(*args))
    assert f"resuming from {out / 'checkpoints' / 'step_00000002'}" in done.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert losses(out) == losses(fsdp2_two)


def test_nan_on_one_rank_is_skipped_on_both_then_stops(tmp_path):
    """Rank 1's images become NaN from step 4: every rank skips the step alike (no hang), counts
    it, and after 3 in a row the run stops with exit 1; the checkpoint of step 3 is intact."""
    out = tmp_path / "run"
    args = ["train", "tiny", "--out", str(out), *QUIET, *FSDP2, "--set", "train.steps=8", "--set", "train.ckpt_every=3",
            "--set", "train.max_skipped_steps=3"]
    done = run(torchrun(*faults("nan", 4, *args), script=FAULTS), ok=False)
    assert done.returncode != 0
    assert "training diverged: the 3 steps up to step 6 had non-finite gradients" in done.stderr
    rows = [r for r in records(out) if r.get("event") != "eval"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000003"]


def test_a_hanging_rank_fails_the_run_naming_it(tmp_path):
    """Rank 1 stops answering at step 3 (it waits until torchrun ends it): after parallel.timeout_s
    rank 0 fails with one line naming the collective it waited in, the step, and the rank that
    did not answer. (The subprocess timeout only guards the suite against a hang.)"""
    done = run(torchrun(*faults("hang", 3, "train", "tiny", "--out", str(tmp_path / "run"), *QUIET, *FSDP2,
                                "--set", "parallel.timeout_s=3"), script=FAULTS), ok=False, timeout=240)
    assert done.returncode != 0
    line = [l for l in done.stderr.splitlines() if l.startswith("graft: rank 0 waited")]
    assert len(line) == 1, done.stderr[-3000:]
    collective = r"(all_reduce|all_gather\w*|reduce_scatter\w*|broadcast|barrier)"  # today: all_reduce
    assert re.match(rf"graft: rank 0 waited 3 s in {collective}\b.* at step 3; rank 1 did not answer "
                    r"\(parallel\.timeout_s=3\)\.", line[0]), line[0]


def free_port() -> int:
    """A port nobody listens on now (the OS picks it): no fixed port for two test runs to fight over."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_by_c10d_rendezvous_train_like_standalone(tmp_path, fsdp2_two):
    """Two torchrun agents meeting through a c10d rendezvous (as on 2 nodes; here both on localhost,
    one process each), FSDP2: exactly the losses of the same two processes under --standalone
    (which equal one process's, test_ddp_and_fsdp2_on_two_processes_equal_one_process)."""
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=localhost:{free_port()}", f"--rdzv-id={tmp_path.name}", "-m", "graft",
            *two_processes(tmp_path / "nodes")]
    agents = [subprocess.Popen(node, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert losses(tmp_path / "nodes") == losses(fsdp2_two)
