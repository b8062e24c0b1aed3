"""Each optimiser, schedule and checkpoint setting changes what it names, and only that: warm-up,
cosine and its floor (optim.warmup_steps, optim.min_lr_ratio), optim.weight_decay, optim.beta1/2,
optim.grad_clip, train.keep_checkpoints; a resumed run refuses changed settings; `graft demo`.

Each run is the `tiny` recipe for a few steps, in this process. Two runs that differ in one setting
start from the same weights and see the same batches, so what differs is that setting's doing."""

import json
import math

import pytest
import torch

from graft.cli import main
from graft.trainer.checkpoint import read_model

QUIET = ["train.progress=false", "eval.splits=[]", "train.log_every=1", "train.peak_flops=1e11"]


def train(out, *settings: str, code: int = 0):
    args = [a for s in (*QUIET, *settings) for a in ("--set", s)]
    assert main(["train", "tiny", "--out", str(out), *args]) == code
    return out


def logged(run, key: str) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if r.get("event") != "eval"]


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return read_model(run / "checkpoints" / f"step_{step:08d}")


def test_warmup_then_cosine_to_its_floor(tmp_path):
    """The lr each step uses, computed here from the formula: linear warm-up from lr/warmup to lr
    over optim.warmup_steps, then a cosine from lr to lr·min_lr_ratio at train.steps."""
    lr, warmup, floor, steps = 0.01, 4, 0.2, 12

    def expected(step):  # 0-based step
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))

    run = train(tmp_path / "a", f"train.steps={steps}", f"optim.lr={lr}", f"optim.warmup_steps={warmup}",
                f"optim.min_lr_ratio={floor}")
    assert logged(run, "lr") == pytest.approx([expected(s) for s in range(steps)], rel=1e-12)
    no_warmup = train(tmp_path / "b", "train.steps=3", f"optim.lr={lr}", "optim.warmup_steps=0", "optim.min_lr_ratio=1")
    assert logged(no_warmup, "lr") == [lr, lr, lr]  # a floor of 1: constant


def test_weight_decay_shrinks_matrices_by_lr_times_decay_and_nothing_else(tmp_path):
    """AdamW's decoupled decay (Loshchilov & Hutter): one step with decay w moves a matrix by −η·w·p0
    more than the same step without it (the Adam part of the step is the same: same gradients);
    norms and biases are exempt, bit for bit."""
    eta, w = 0.01, 0.5
    one_step = ["train.steps=1", "train.ckpt_every=1", "optim.warmup_steps=0"]
    p0 = weights(train(tmp_path / "init", *one_step, "optim.lr=0"), 1)  # lr 0: the initial weights
    plain = weights(train(tmp_path / "plain", *one_step, f"optim.lr={eta}", "optim.weight_decay=0"), 1)
    decayed = weights(train(tmp_path / "decayed", *one_step, f"optim.lr={eta}", f"optim.weight_decay={w}"), 1)
    matrices = [k for k, v in p0.items() if v.ndim >= 2]
    assert len(matrices) > 10
    for k in matrices:
        # fp32: each of p1(w) and p1(0) is rounded once more than p0 (~6e-8 of |p| each)
        torch.testing.assert_close(decayed[k] - plain[k], -eta * w * p0[k], rtol=1e-3,
                                   atol=4e-7 * p0[k].abs().max().item(), msg=k)
    for k in set(p0) - set(matrices):
        assert torch.equal(decayed[k], plain[k]), k


def test_betas_reach_adamw(tmp_path):
    """beta1/beta2 are what AdamW runs with (saved in the optimizer state), and they matter from
    the second step on: after one step Adam's bias-corrected moments are g and g² whatever the
    betas, after two they weigh the two gradients differently."""
    base = ["train.steps=2", "train.ckpt_every=1", "train.keep_checkpoints=2", "optim.warmup_steps=0", "optim.lr=0.01"]
    runs = {betas: train(tmp_path / f"b{betas[0]}_{betas[1]}", *base, f"optim.beta1={betas[0]}",
                         f"optim.beta2={betas[1]}") for betas in ((0.9, 0.98), (0.5, 0.98), (0.9, 0.5))}
    for betas, run in runs.items():
        groups = json.loads((run / "checkpoints" / "step_00000002" / "train_state.json").read_text())["param_groups"]
        assert all(tuple(g["betas"]) == betas for g in groups)
    ref = runs[(0.9, 0.98)]
    for other in ((0.5, 0.98), (0.9, 0.5)):
        first, second = weights(runs[other], 1), weights(runs[other], 2)
        for k, v in weights(ref, 1).items():  # step 1: the same update up to rounding (~1e-7 of 0.01)
            torch.testing.assert_close(first[k], v, rtol=0, atol=1e-6, msg=k)
        moved = max((second[k] - v).abs().max().item() for k, v in weights(ref, 2).items())
        assert moved > 1e-4, (other, moved)  # step 2: 100x step 1's bound (measured 9e-4 and more)


def test_grad_clip_caps_the_norm_only_when_it_exceeds_it(tmp_path):
    """optim.grad_clip scales the gradients to that global norm when they exceed it: a cap above
    every step's norm trains bit for bit like no cap (0); a cap below them changes the updates.
    The logged grad_norm is the norm before clipping."""
    base = ["train.steps=3", "train.ckpt_every=3", "optim.warmup_steps=0", "optim.lr=0.01"]
    free, high, low = (train(tmp_path / n, *base, f"optim.grad_clip={c}")
                       for n, c in (("free", 0), ("high", 1e6), ("low", 1e-3)))
    norms = logged(free, "grad_norm")
    assert min(norms) > 1e-2  # so 1e-3 clips every step
    assert logged(low, "grad_norm")[0] == norms[0]  # the same first gradient, reported before clipping
    assert all(torch.equal(a, b) for a, b in zip(weights(free, 3).values(), weights(high, 3).values()))
    moved = max((weights(low, 3)[k] - v).abs().max().item() for k, v in weights(free, 3).items())
    assert moved > 1e-3, moved  # Adam's moments now mix gradients rescaled by different factors


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    for keep in (1, 3):
        run = train(tmp_path / f"keep{keep}", "train.steps=5", "train.ckpt_every=1", f"train.keep_checkpoints={keep}")
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == [f"step_{s:08d}" for s in range(6 - keep, 6)], names


def test_a_resumed_run_refuses_changed_settings_and_takes_more_steps(tmp_path, capsys):
    """Settings that change what is learned are refused on resume, in one line naming the key and
    both values, nothing written; train.steps may grow (the schedule ends at the new total)."""
    run = train(tmp_path / "run", "train.steps=4", "train.ckpt_every=2")
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    train(run, "train.steps=4", "train.ckpt_every=2", "optim.lr=0.02", code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr=0.002, not 0.02" in err[0], err
    assert (run / "metrics.jsonl").read_text() == before
    train(run, "train.steps=6", "train.ckpt_every=2")
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("event") != "eval"] == list(range(1, 7))


def test_graft_demo_trains_evaluates_and_reports(tmp_path, capsys):
    """`graft demo` (README line 1) at a few steps: the default recipe on the built-in world, the
    results table printed, a report with its loss plot written. (How well the full demo learns is
    measured by the slow tier's learning tests and in the README.)"""
    out = tmp_path / "demo"
    sets = ["train.steps=6", "train.log_every=3", "train.ckpt_every=6", "train.progress=false",
            "eval.vqa_per_type=2", "eval.captions=2", "eval.splits=[test]"]
    assert main(["demo", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    assert "training 'shapes_spatial' on the built-in Shapes world" in printed
    results = json.loads((out / "eval.json").read_text())
    assert "vqa_acc" in results and "caption_cider" in results
    assert "vqa_acc" in printed and f"report: {out / 'report.md'}" in printed
    assert "# graft run: shapes_spatial" in (out / "report.md").read_text() and (out / "loss.png").is_file()
