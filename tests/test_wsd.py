"""Warmup-stable-decay (`optim.schedule=wsd`, graft/trainer/optim.py) and the sweep that decays each
shorter budget from one longer run's checkpoint (graft/sweep_wsd.py): the schedule's shape, a branch
equal bit for bit to the same run trained alone, a WSD sweep's points, and bad settings in one line."""

import csv
import json

import pytest
import torch

from graft.cli import main
from graft.sweep_wsd import branch
from graft.trainer.checkpoint import read_model
from graft.trainer.optim import wsd_decay_start, wsd_factor
from tests.helpers import cli, one_line_error

QUIET = ["train.progress=false", "train.log_every=1", "eval.splits=", "optim.warmup_steps=4", "optim.schedule=wsd"]


def train(out, steps, *sets):
    args = [*QUIET, f"train.steps={steps}", f"train.ckpt_every={steps}", *sets]
    return main(["train", "tiny", "--out", str(out), *(a for s in args for a in ("--set", s))])


def test_the_schedule_warms_up_holds_then_decays_linearly_to_its_floor():
    total, warmup, floor = 100, 10, 0.1
    lrs = [wsd_factor(s, total, warmup, floor, 0.2) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear warmup
    start = wsd_decay_start(total, warmup, 0.2)
    assert start == 80 and set(lrs[10:start + 1]) == {1.0}  # held until the decay starts, and at it
    assert lrs[90] == pytest.approx(1 - 0.9 * 0.5) and lrs[100] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs[start:], lrs[start + 1:]))
    # a shorter run's factors are the longer run's until the shorter one's decay starts
    short = wsd_decay_start(40, warmup, 0.2)
    assert [wsd_factor(s, 40, warmup, floor, 0.2) for s in range(short + 1)] == lrs[:short + 1]
    assert wsd_decay_start(12, 10, 0.5) == 10  # never inside the warmup


def test_a_branch_from_a_longer_runs_checkpoint_is_the_shorter_run_bit_for_bit(tmp_path):
    start = wsd_decay_start(20, 4, 0.2)  # 16
    assert train(tmp_path / "alone", 20) == 0
    assert train(tmp_path / "long", 30, f"train.keep_steps=[{start}]", "train.ckpt_every=5") == 0
    assert (tmp_path / "long" / "checkpoints" / f"step_{start:08d}").is_dir()  # kept beside the latest two
    branch(tmp_path / "long", start, tmp_path / "branch")
    assert train(tmp_path / "branch", 20) == 0
    mine, theirs = read_model(tmp_path / "branch" / "checkpoints" / "step_00000020"), \
        read_model(tmp_path / "alone" / "checkpoints" / "step_00000020")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    def logged(run):
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert logged(tmp_path / "branch") == logged(tmp_path / "alone")  # steps 1-16 from the long run's log, then its own
    assert logged(tmp_path / "long")[19] != logged(tmp_path / "alone")[19]  # the long run did not decay there


@pytest.mark.slow  # trains a run and a branch in processes of their own
def test_a_wsd_sweep_trains_a_size_once_and_decays_the_shorter_budget_from_it(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ("scale", "sweep", "tiny", "--budgets", "3e9", "6e9", "--sizes", "16x1", "--out", out,
            "--set", "optim.schedule=wsd", "--set", "optim.warmup_steps=4", "--bootstrap", "20")
    code, printed, err = cli(capsys, *args)
    assert code == 0, err
    assert printed.count("decays from step") == 1
    rows = {r["run"]: r for r in csv.DictReader((out / "points.csv").open())}
    assert len(rows) == 2
    for name, r in rows.items():
        run = out / "runs" / name
        steps = int(r["steps"])
        trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged = [x["step"] for x in trained if "loss" in x]
        assert logged[-1] == steps and logged == sorted(set(logged))  # one log through its own last step
        assert float(r["loss"]) == json.loads((run / "eval.json").read_text())["heldout_loss"]
    for name in (n for n in rows if "C3.00e09" in n):  # a branch, from the longer run's kept checkpoint
        start = wsd_decay_start(int(rows[name]["steps"]), 4, 0.2)
        assert (out / "runs" / name.replace("C3.00e09", "C6.00e09") / "checkpoints" / f"step_{start:08d}").is_dir()
    assert "warmup-stable-decay" in (out / "report.md").read_text()
    one_line_error(cli(capsys, *args[:-2], "--launch", "slurm"), "--launch with optim.schedule=wsd")


@pytest.mark.parametrize("sets, needle", [
    (["optim.schedule=linear"], "optim.schedule='linear' is not one of cosine, wsd"),
    (["optim.schedule=cosine", "optim.decay_fraction=0.3"], "optim.decay_fraction=0.3 is read by optim.schedule=wsd only"),
    (["optim.decay_fraction=0"], "optim.decay_fraction=0.0 must be in (0, 1]"),
    (["train.keep_steps=[40]"], "train.keep_steps=[40]: each must be a step of the run"),
])
def test_bad_schedule_settings_are_one_line(tmp_path, capsys, sets, needle):
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "run", "--set", "train.steps=20",
                       "--set", "optim.schedule=wsd", *(a for s in sets for a in ("--set", s))), needle)
    assert not (tmp_path / "run").exists()
