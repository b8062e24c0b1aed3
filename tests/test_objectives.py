"""Named losses (graft/losses.py, trainer/loop.py): each a local sum over what `loss_counts` counts,
divided by the count of the whole step, weighted by `train.objectives`, logged as `loss/<name>`."""

import json

import pytest

from graft.cli import main

QUIET = ["--set", "eval.splits=", "--set", "train.progress=false", "--set", "train.log_every=1",
         "--set", "train.steps=3", "--set", "train.ckpt_every=3"]


def first_steps(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") != "eval"]


@pytest.mark.parametrize("recipe, name", [("tiny", "lm"), ("clip", "itc")])
def test_grad_accumulation_equals_one_big_batch(tmp_path, recipe, name):
    """The same 32 samples per step in one batch or two micro-batches: the same token-weighted loss
    and gradient (micro-batches hold different numbers of answer tokens, so a mean of micro-batch
    means would differ)."""
    small = [f"--set={part}.{key}={value}" for part in ("vision", "text") for key, value in
             (("hidden_size", 32), ("layers", 1), ("intermediate_size", 64))] if recipe == "clip" else []
    runs = {}
    for accum in (1, 2):
        run = tmp_path / f"accum{accum}"
        assert main(["train", recipe, "--out", str(run), *QUIET, *small, "--set", "train.batch_size=32",
                     "--set", f"train.grad_accum={accum}"]) == 0
        runs[accum] = first_steps(run)
    one, two = runs[1][0], runs[2][0]
    assert one[f"loss/{name}"] == one["loss"]  # one objective, weight 1
    if name == "lm":  # a contrastive loss over 2 x 16 pairs is another loss than over 32 pairs
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6)
        assert [r["loss"] for r in runs[2]] == pytest.approx([r["loss"] for r in runs[1]], rel=1e-5)
    else:
        assert two["loss"] != pytest.approx(one["loss"], rel=1e-6)


def test_objective_weights_reach_the_loss_and_the_gradient(tmp_path):
    base, half = tmp_path / "base", tmp_path / "half"
    assert main(["train", "tiny", "--out", str(base), *QUIET]) == 0
    assert main(["train", "tiny", "--out", str(half), *QUIET, "--set", "train.objectives={lm: 0.5}"]) == 0
    a, b = first_steps(base)[0], first_steps(half)[0]
    assert b["loss/lm"] == pytest.approx(a["loss/lm"], rel=1e-6)  # the same loss, weighed half
    assert b["loss"] == pytest.approx(0.5 * a["loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(0.5 * a["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("value, needle", [("{itm: 1}", "'itm' is not a loss of model=vlm (its losses: lm)"),
                                           ("{lm: -1}", "must be finite and ≥ 0"), ("{lm: 0}", "every loss weighs 0"),
                                           ("[lm]", "expects a mapping")])
def test_bad_objectives_are_one_line(tmp_path, capsys, value, needle):
    assert main(["train", "tiny", "--out", str(tmp_path / "run"), "--set", f"train.objectives={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "run").exists()
