"""Crash safety: kill -9 mid-run and resume gives the same losses bit for bit; a kill during a
checkpoint write leaves the previous checkpoint complete and loadable.

Kills and signals land at a known point, never by watching a running job: the run (graft's CLI
with a hook, tests/scripts/faults.py) writes a marker and waits inside the chosen step until the
test has signalled it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from graft import atomic
from graft.trainer import checkpoint
from tests.helpers import wait_for

SCRIPTS = Path(__file__).parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = 12
ARGS = ["--set", f"train.steps={STEPS}", "--set", "train.ckpt_every=4", "--set", "train.log_every=1",
        "--set", "train.progress=false", "--set", "eval.splits=", "--set", "train.peak_flops=1e11"]


def train_args(out, *sets):
    return ["train", "tiny", "--out", str(out), *ARGS, *sets]


def graft(*args):
    return [sys.executable, "-m", "graft", *args]


def paused(step, marker, *args):
    """graft's CLI running ARGS, paused inside step STEP until a signal arrives (tests/scripts/faults.py)."""
    return [sys.executable, str(SCRIPTS / "faults.py"), "pause", str(step), str(marker), "--", *args]


def losses(run):
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if r.get("event") != "eval"]


def logged_steps(run):
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def reference(shared_run):
    """The uninterrupted run, in a subprocess with the same environment as the interrupted ones
    (what is compared bit for bit must run alike)."""
    return shared_run("resume_reference", lambda out: subprocess.run(
        graft(*train_args(out)), check=True, capture_output=True, timeout=600, env=ENV))


def start_paused(step, tmp_path, *args):
    """Start ARGS paused inside step STEP; returns once it is paused there (its marker written).
    The deadline only keeps a broken run from hanging the suite: the run waits for the test."""
    marker = tmp_path / "paused"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(paused(step, marker, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    wait_for([tmp_path / "paused.rank0"], proc, detail=lambda: (tmp_path / "stderr").read_text()[-2000:])
    return proc


@pytest.mark.slow  # starts processes
def test_kill_9_and_resume_reproduces_uninterrupted_losses(tmp_path, reference):
    """kill -9 inside step 10 (steps 1-9 logged, checkpoints of steps 4 and 8): the same command
    resumes from step 8 and logs exactly the uninterrupted run's losses, gradient norms and
    learning rates, every step once (9, logged before the kill, is trained and logged again)."""
    run = tmp_path / "killed"
    proc = start_paused(10, tmp_path, *train_args(run))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert logged_steps(run) == list(range(1, 10))
    assert checkpoint.latest(run / "checkpoints").name == "step_00000008"

    resumed = subprocess.run(graft(*train_args(run)), check=True, capture_output=True, text=True, timeout=600, env=ENV)
    assert f"resuming from {run / 'checkpoints' / 'step_00000008'}" in resumed.stdout
    assert losses(run) == losses(reference)  # exact float equality, every step
    assert len(losses(run)) == STEPS


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("sig", [signal.SIGINT])  # SIGTERM: under torchrun in test_parallel.py
def test_a_signal_checkpoints_the_step_and_the_same_command_resumes(tmp_path, reference, sig):
    """SIGTERM (Slurm, Kubernetes) or Ctrl-C arriving inside step 6: that step finishes, its
    checkpoint is saved (ckpt_every=1000 would not have saved it), one line says where it stopped,
    exit 128 + signal; the same command then resumes with the uninterrupted run's losses."""
    run = tmp_path / "stopped"
    args = train_args(run, "--set", "train.ckpt_every=1000")  # a resumable change: the same losses
    proc = start_paused(6, tmp_path, *args)  # it goes on with step 6 once the signal has arrived
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + sig, err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("graft: stopped")]
    expected = (f"graft: stopped by {sig.name} after step 6 of {STEPS}; checkpoint "
                f"{run / 'checkpoints' / 'step_00000006'} saved. The same command resumes from it.")
    assert line == [expected], err[-2000:]
    assert logged_steps(run) == list(range(1, 7))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000006"]
    resumed = subprocess.run(graft(*args), check=True, capture_output=True, text=True, timeout=600, env=ENV)
    assert f"resuming from {run / 'checkpoints' / 'step_00000006'}" in resumed.stdout
    assert losses(run) == losses(reference)


def _tiny_state():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _saved(root, steps):
    model, opt, sched = _tiny_state()
    saver = checkpoint.Saver(root, keep=5)
    for step in steps:
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        saver.save(step, model, opt, sched, {})
    return model, opt


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """kill -9 once every file of checkpoint 2 is written but before it is flushed and renamed:
    checkpoint 1 is the latest, loads whole, and the partial directory is cleaned away."""
    root, marker = tmp_path / "checkpoints", tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from graft.trainer import checkpoint
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        saver = checkpoint.Saver(Path({str(root)!r}), keep=2)
        saver.save(1, model, opt, sched, {{}})
        def stays(path):  # the kill lands here: every file written, not yet renamed
            Path({str(marker)!r}).write_text("flushing")
            while True:
                time.sleep(1)
        checkpoint._fsync_tree = stays
        with torch.no_grad():
            model.weight.add_(1.0)
        saver.save(2, model, opt, sched, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV)
    try:
        wait_for([marker], proc, guard_s=120)  # the save got to its flush
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (root / ".tmp-step_00000002" / "meta.json").is_file()  # written, under its temporary name

    assert checkpoint.latest(root).name == "step_00000001"
    model, opt, sched = _tiny_state()
    checkpoint.load_weights(model, checkpoint.latest(root))
    assert checkpoint.load_train_state(checkpoint.latest(root), model, opt, sched)["step"] == 1
    checkpoint.clean_partial(root)
    assert not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("harm", ["truncate", "remove", "garble_meta", "pickle"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, capfd, harm):
    root = tmp_path / "checkpoints"
    model, opt = _saved(root, [1, 2])
    bad = root / "step_00000002"
    weights = next((bad / "model").glob("*.safetensors"))
    if harm == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif harm == "remove":
        weights.unlink()
    elif harm == "garble_meta":
        (bad / "meta.json").write_text('{"step": ')
    else:  # a pickle in place of the RNG file is refused, never unpickled
        torch.save({"x": Evil()}, next((bad / "rng").glob("*.safetensors")))
    assert checkpoint.latest(root).name == "step_00000001"
    err = capfd.readouterr()
    assert f"skipping damaged checkpoint {bad}" in err.err
    assert "pickle executed" not in err.out + err.err
    fresh, opt2, sched2 = _tiny_state()
    assert checkpoint.load_train_state(checkpoint.latest(root), fresh, opt2, sched2)["step"] == 1


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    root = tmp_path / "checkpoints"
    model, opt = _saved(root, [1, 2])
    want = torch.rand(3)  # what the RNG gives right after the save
    fresh, opt2, sched2 = _tiny_state()
    checkpoint.load_train_state(checkpoint.latest(root), fresh, opt2, sched2)
    assert torch.equal(torch.rand(3), want)
    assert torch.equal(fresh.weight, model.weight)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert not any(p.suffix == ".pt" or p.name.endswith(".pkl") for p in root.rglob("*"))  # no pickle written


class Evil:
    def __reduce__(self):
        return (print, ("pickle executed",))


def test_run_files_are_replaced_whole_or_not_at_all(tmp_path):
    """config.yaml, eval.json, report.md and the trimmed metrics.jsonl go through atomic.write_text."""
    path = tmp_path / "eval.json"
    atomic.write_text(path, '{"vqa_acc": 0.5}')
    with pytest.raises(TypeError):
        atomic.write_text(path, None)  # the write fails after the temporary file was opened
    assert path.read_text() == '{"vqa_acc": 0.5}'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_tokenizer_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """tokenizer.json goes through atomic.py too: a failed write leaves no tokenizer and no temporary file."""
    from graft.data.tokenizer import ChatTokenizer
    from graft.rundir import RunDir

    run = RunDir(tmp_path)
    tok = ChatTokenizer.train(["a red circle"], 300)

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        run.save_tokenizer(tok)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    run.save_tokenizer(tok)
    assert ChatTokenizer.load(run.tokenizer_path).encode("a red circle") == tok.encode("a red circle")


def test_a_diverging_run_stops_after_max_skipped_steps_with_one_line(tmp_path, capfd):
    """lr 1e30 sends the weights to ~1e30 in one (finite) step; every later step's gradients are
    NaN and skipped. After train.max_skipped_steps in a row the run stops: one line, exit 1.
    (graft's CLI in this process: no start-up to pay.)"""
    from graft.cli import main

    run = tmp_path / "run"
    code = main(["train", "tiny", "--out", str(run), "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0",
                 "--set", "train.max_skipped_steps=5", "--set", "train.log_every=1", "--set", "train.steps=50",
                 "--set", "train.progress=false", "--set", "eval.splits="])
    err = capfd.readouterr().err
    assert code == 1, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("graft: ")]
    assert len(lines) == 1 and "training diverged: the 5 steps up to step" in lines[0], err[-2000:]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_steps"] for r in records if "skipped_steps" in r]  # per logged step (log_every=1)
    assert skipped[-5:] == [1] * 5 and records[-1]["step"] < 50
