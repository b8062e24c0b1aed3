"""Crash safety: kill -9 mid-run and resume gives the same losses bit for bit; a kill during a
checkpoint write leaves the previous checkpoint complete and loadable."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from graft import atomic
from graft.train import checkpoint

STEPS = 120  # long enough to be stopped after 30-40 logged steps (a tiny step takes ~15 ms)
ARGS = ["--set", f"train.steps={STEPS}", "--set", "train.ckpt_every=7", "--set", "train.log_every=1",
        "--set", "train.progress=false", "--set", "eval.vqa_per_type=1", "--set", "eval.captions=1",
        "--set", "train.peak_flops=1e11"]


def train_cmd(out):
    return [sys.executable, "-m", "graft", "train", "tiny", "--out", str(out), *ARGS]


def losses(run):
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if r.get("event") != "eval"]


def logged_steps(run):
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_kill_9_and_resume_reproduces_uninterrupted_losses(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(reference), check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while logged_steps(run) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = logged_steps(run)
    assert 0 < killed_at < STEPS

    resumed = subprocess.run(train_cmd(run), check=True, capture_output=True, text=True, timeout=600)
    assert "resuming from" in resumed.stdout
    assert losses(run) == losses(reference)  # exact float equality, every step
    assert len(losses(run)) == STEPS


@pytest.mark.parametrize("sig", [signal.SIGINT])  # SIGTERM: under torchrun in test_parallel.py
def test_a_signal_checkpoints_the_step_and_the_same_command_resumes(tmp_path, sig):
    """SIGTERM (Slurm, Kubernetes) or Ctrl-C: the step in progress finishes, its checkpoint is saved
    (ckpt_every would not have saved it), one line says where it stopped, exit 128 + signal; the
    same command then resumes with the uninterrupted run's losses."""
    reference = tmp_path / "reference"

    def cmd(out):
        return [*train_cmd(out), "--set", "train.ckpt_every=1000"]

    subprocess.run(cmd(reference), check=True, capture_output=True, timeout=600)
    run = tmp_path / "stopped"
    proc = subprocess.Popen(cmd(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while logged_steps(run) < 30 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be stopped"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    step = logged_steps(run)
    assert proc.returncode == 128 + sig, err[-2000:]
    line = [l for l in err.splitlines() if l.startswith("graft: stopped")]
    expected = (f"graft: stopped by {sig.name} after step {step} of {STEPS}; checkpoint "
                f"{run / 'checkpoints' / f'step_{step:08d}'} saved. The same command resumes from it.")
    assert line == [expected], err[-2000:]
    assert checkpoint.latest(run / "checkpoints").name == f"step_{step:08d}"
    resumed = subprocess.run(cmd(run), check=True, capture_output=True, text=True, timeout=600)
    assert "resuming from" in resumed.stdout
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
    root = tmp_path / "checkpoints"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from graft.train import checkpoint
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        saver = checkpoint.Saver(Path({str(root)!r}), keep=2)
        saver.save(1, model, opt, sched, {{}})
        checkpoint._fsync_tree = lambda path: time.sleep(60)  # the kill lands here: every file written, not renamed
        with torch.no_grad():
            model.weight.add_(1.0)
        saver.save(2, model, opt, sched, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (root / ".tmp-step_00000002" / "meta.json").is_file() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

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


def test_a_diverging_run_stops_after_max_skipped_steps_with_one_line(tmp_path):
    """lr 1e30 sends the weights to ~1e30 in one (finite) step; every later step's gradients are
    NaN and skipped. After train.max_skipped_steps in a row the run stops: one line, exit 1."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "graft", "train", "tiny", "--out", str(run), "--set", "optim.lr=1e30",
           "--set", "optim.warmup_steps=0", "--set", "train.max_skipped_steps=5", "--set", "train.log_every=1",
           "--set", "train.steps=50", "--set", "train.progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [l for l in done.stderr.splitlines() if l.startswith("graft: ")]
    assert len(lines) == 1 and "training diverged: the 5 steps up to step" in lines[0], done.stderr[-2000:]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_steps"] for r in records if "skipped_steps" in r]  # per logged step (log_every=1)
    assert skipped[-5:] == [1] * 5 and records[-1]["step"] < 50
