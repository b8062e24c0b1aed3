"""Distillation of a VLM from frozen VLM teachers (graft/distill_lm.py, designs/vlm_teachers.py): the
two losses against their formulas and gradcheck, the teacher's outputs equal to its own model's, a
student run that learns them and keeps the teacher out, a student taught by logits alone that
learns the world from its teacher, bad settings refused in one line."""

import json

import pytest
import torch

from graft.build import load_run, processor_for, step_losses
from graft.cli import main
from graft.distill_lm import answer_positions, hidden_mse_sum, logit_kd_sum
from graft.losses import IGNORE
from graft.recipes import recipe
from graft.rundir import RunDir
from graft.trainer.checkpoint import read_model

# one object per image for teacher and students alike (the world's tokenizer depends on data.max_objects)
QUIET = ["train.progress=false", "train.log_every=1", "eval.splits=[]", "data.max_objects=1"]


def train(out, *sets, recipe_name="tiny"):
    return main(["train", recipe_name, "--out", str(out), *(a for s in (*QUIET, *sets) for a in ("--set", s))])


# the end-to-end test's half-width shapes_vqa (tests/test_e2e.py), which learns colour and size in 150 steps
SMALL = ["vision.hidden_size=64", "vision.intermediate_size=128", "vision.layers=2", "lm.layers=2",
         "train.batch_size=32", "optim.warmup_steps=50"]


def _teacher(out):
    assert train(out / "teacher", *SMALL, "lm.hidden_size=64", "lm.intermediate_size=192", "train.steps=150",
                 "train.ckpt_every=150") == 0


@pytest.fixture
def teacher(shared_run):
    """A VLM with a 64-wide, 2-layer LM (the tiny students': 32 wide), trained 150 steps: on the
    test split colour 1.00, size 1.00 (one thread, AMD EPYC; ~22 s). Trained once per session
    (conftest's `shared_run`), whichever xdist worker asks first; the tests only read it."""
    return shared_run("distill_lm_teacher", _teacher) / "teacher"


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the losses against their formulas ------------------------------------------------------------


def test_logit_kd_is_tau_squared_kl_of_teacher_to_student():
    s, t, tau = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64), 2.0
    expected = 0.0
    for i in range(5):
        p, log_q = torch.softmax(t[i] / tau, 0), torch.log_softmax(s[i] / tau, 0)
        expected += tau**2 * (p * (p.log() - log_q)).sum().item()
    assert logit_kd_sum(s, t, tau).item() == pytest.approx(expected, rel=1e-12)
    assert logit_kd_sum(t, t, tau).item() == pytest.approx(0.0, abs=1e-12)


def test_hidden_is_the_featurewise_mean_squared_error_summed_over_tokens():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    assert hidden_mse_sum(s, t).item() == pytest.approx(sum(((s[i] - t[i]) ** 2).mean().item() for i in range(4)))


def test_losses_pass_gradcheck_in_fp64():
    s, t = torch.randn(3, 7, dtype=torch.float64, requires_grad=True), torch.randn(3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: logit_kd_sum(x, t, 1.5), (s,))
    assert torch.autograd.gradcheck(lambda x: hidden_mse_sum(x, t), (s,))


def test_answer_positions_predict_the_supervised_tokens():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, 7]])
    assert answer_positions(labels).tolist() == [[False, True, True, False, True, False]]


# ---- the teacher and the student ------------------------------------------------------------------


def test_the_teachers_outputs_are_its_own_models(teacher):
    """What the trainer's teacher gives for a student batch equals the teacher run's model, loaded
    as `graft eval` loads it, on the same rows: logits at the answer positions, the named layer's
    states at the real tokens."""
    cfg = recipe("tiny", [f"distill.teachers=[{teacher}]", "distill.losses=[logits,hidden]", "distill.layers={0: 0}",
                          "data.max_objects=1"])
    proc = processor_for(cfg)
    from graft.build import build_model

    student = build_model(cfg, proc.tok)
    losses = step_losses(cfg, student, proc.tok)
    from graft.data.world_source import make_world, training_turns
    import random

    world, rng = make_world(cfg), random.Random(0)
    rows = [proc.conversation(training_turns(world.sample("train", i), rng, 4, 0.0)) for i in range(3)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [proc.tok.pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    pixels = torch.stack([proc.pixels(world.sample("train", i).image) for i in range(3)])
    batch = {"input_ids": ids, "labels": labels, "pixel_values": pixels}
    [(logits, [states])] = losses.teach(batch)

    _, _, model, _ = load_run(RunDir(teacher))
    hidden = {0: None}
    with torch.no_grad():
        own, _ = model(ids, pixels, hidden=hidden)
    torch.testing.assert_close(logits, own[answer_positions(labels)])
    torch.testing.assert_close(states, hidden[0][ids != proc.tok.pad])
    assert logits.shape[0] == int((labels != IGNORE).sum())


def test_student_learns_both_losses_and_keeps_the_teacher_out(tmp_path, teacher):
    out = tmp_path / "student"
    assert train(out, f"distill.teachers=[{teacher}]", "distill.losses=[logits,hidden]", "distill.layers={-1: -1}",
                 "distill.temperature=2", "train.steps=12", "train.ckpt_every=12") == 0
    steps = [r for r in records(out) if "loss/distill_logits" in r]
    for name in ("loss/distill_logits", "loss/distill_hidden"):
        values = [r[name] for r in steps]
        assert len(values) == 12 and values[-1] < values[0], (name, values)
    assert all(r["teacher_flops_per_s"] > 0 for r in steps)
    weights = read_model(out / "checkpoints" / "step_00000012")
    assert weights["distill_proj.0.0.weight"].shape == (64, 32)  # the student's map to the teacher's width
    assert not any(k.startswith("teacher") for k in weights)
    assert len(weights) == len(read_model(RunDir(out).latest_checkpoint())) == len(
        [k for k in weights if not k.startswith("distill_proj")]) + 1
    cfg, _, model, _ = load_run(RunDir(out))  # a finished student loads and generates like any VLM
    assert cfg.distill.teachers == [str(teacher)]


@pytest.mark.slow
def test_a_student_taught_by_logits_alone_learns_from_the_teacher(tmp_path, teacher):
    """No answer label reaches the student (train.objectives lm=0): what it learns of the world
    comes through the teacher's logits. A model blind to the image answers size at 1/2 and colour at
    1/5 at best (each shape leaves five colours on the test split). Measured (one thread, AMD EPYC,
    150 steps, 50 questions per type): the student size 0.94, colour 0.40; the teacher 1.00, 1.00."""
    sets = [*SMALL, "lm.hidden_size=32", "lm.intermediate_size=96", "train.steps=150", "train.ckpt_every=150",
            "eval.splits=[test]", "eval.vqa_per_type=50", "eval.captions=0", "train.objectives={lm: 0, distill_logits: 1}"]
    taught = tmp_path / "taught"
    assert train(taught, f"distill.teachers=[{teacher}]", *sets) == 0
    results = json.loads((taught / "eval.json").read_text())
    assert all(r["loss/lm"] > 0 and r["loss"] > 0 for r in records(taught) if "loss/lm" in r)  # lm logged, not trained
    assert results["vqa_acc/size"] >= 0.75 and results["vqa_acc/color"] >= 0.3, results


def test_bad_settings_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, teacher):
    clip = tmp_path / "clip"
    assert train(clip, "train.steps=1", "train.ckpt_every=1", recipe_name="clip") == 0
    other_tok = tmp_path / "other_tok"
    assert train(other_tok, "data.vocab_size=320", "train.steps=1", "train.ckpt_every=1") == 0
    pooled = tmp_path / "pooled"
    assert train(pooled, "connector.kind=avgpool", "connector.tokens=4", "train.steps=1", "train.ckpt_every=1") == 0
    capsys.readouterr()
    t = f"distill.teachers=[{teacher}]"
    cases = [([f"distill.teachers=[{clip}]"], "is a model=dual run, not a VLM"),
             ([t, "distill.losses=[logits,fd]"], "'fd' is not one of logits, hidden"),
             ([t, "distill.losses=[hidden]"], "hidden needs distill.layers"),
             ([t, "distill.layers={0: 0}"], "is read by the hidden loss only"),
             ([t, "distill.losses=[hidden]", "distill.layers={3: 0}"], "the student's LM has 1 layers"),
             ([t, "distill.losses=[hidden]", "distill.layers={0: 5}"], "has 2 layers"),
             ([t, "distill.losses=[hidden]", "distill.layers={top: 0}"], "expects an integer"),
             ([t, "distill.losses=[hidden]", "distill.layers={0: 0}", "distill.temperature=2"], "read by logits only"),
             ([f"distill.teachers=[{other_tok}]"], "has another tokenizer"),
             ([f"distill.teachers=[{pooled}]"], "gives an image 4 tokens, this run 9"),
             ([f"distill.teachers=[{tmp_path / 'nowhere'}]"], "run directory not found")]
    for sets, needle in cases:
        out = tmp_path / "run"
        assert train(out, "train.steps=2", *sets) == 2, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (sets, err)
        assert not out.exists(), sets
