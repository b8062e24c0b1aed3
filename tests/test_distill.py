"""CLIP-KD distillation of a dual encoder from frozen dual-encoder teachers (graft/distill.py,
designs/dual.py): the three losses against their plain formulas and gradcheck, a student run that
learns them, the teacher kept out of the student, bad settings refused in one line."""

import json

import pytest
import torch
import torch.nn.functional as F

from graft.cli import main
from graft.distill import crd_loss, fd_loss_sum, icl_loss
from graft.trainer.checkpoint import read_model

SMALL = ["--set", "vision.hidden_size=32", "--set", "vision.layers=1", "--set", "vision.intermediate_size=64",
         "--set", "text.hidden_size=32", "--set", "text.layers=1", "--set", "text.intermediate_size=64",
         "--set", "train.progress=false", "--set", "train.log_every=1", "--set", "eval.splits=",
         "--set", "train.batch_size=16"]
ALL = ["distill_fd", "distill_icl", "distill_crd"]


def train(out, *sets, embed=16, steps=4, recipe="clip"):
    args = ["train", recipe, "--out", str(out), *SMALL, "--set", f"contrastive.embed_dim={embed}",
            "--set", f"train.steps={steps}", "--set", f"train.ckpt_every={steps}"]
    return main([*args, *(a for s in sets for a in ("--set", s))])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    assert train(out, embed=24, steps=3) == 0
    return out


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the losses against their formulas ------------------------------------------------------------


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_fd_is_the_summed_squared_distance():
    s, t = torch.randn(5, 8), torch.randn(5, 8)
    assert fd_loss_sum(s, t).item() == pytest.approx(sum(((s[i] - t[i]) ** 2).sum().item() for i in range(5)))


def test_icl_is_the_student_anchored_infonce():
    si, st, ti, tt, scale = unit(6, 8), unit(6, 8), unit(6, 8), unit(6, 8), torch.tensor(7.0, dtype=torch.float64)
    i2t = -sum(torch.log_softmax(scale * si[i] @ tt.T, 0)[i] for i in range(6)) / 6
    t2i = -sum(torch.log_softmax(scale * st[i] @ ti.T, 0)[i] for i in range(6)) / 6
    assert icl_loss(si, st, ti, tt, scale).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-12)


def test_crd_is_the_kl_of_teacher_to_student_row_softmaxes():
    si, st, ti, tt, scale, tau = unit(6, 8), unit(6, 8), unit(6, 12), unit(6, 12), torch.tensor(5.0, dtype=torch.float64), 0.5

    def kl(p_logits, q_logits):  # KL(softmax(p) ‖ softmax(q)) of one row
        p = torch.softmax(p_logits, 0)
        return (p * (p.log() - torch.log_softmax(q_logits, 0))).sum()

    S, T = scale * si @ st.T, ti @ tt.T / tau
    expected = sum(kl(T[i], S[i]) + kl(T[:, i], S[:, i]) for i in range(6)) / 12
    assert crd_loss(si, st, ti, tt, scale, tau).item() == pytest.approx(expected.item(), rel=1e-12)
    assert crd_loss(ti[:, :8], ti[:, :8], ti, ti, torch.tensor(1.0), 1.0).item() >= 0


@pytest.mark.parametrize("name", ["fd", "icl", "crd"])
def test_losses_pass_gradcheck_in_fp64(name):
    si, st = unit(4, 6).requires_grad_(), unit(4, 6).requires_grad_()
    ti, tt, scale = unit(4, 6), unit(4, 6), torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    fn = {"fd": lambda a, b, s: fd_loss_sum(a, ti) + fd_loss_sum(b, tt) + 0 * s,
          "icl": lambda a, b, s: icl_loss(a, b, ti, tt, s),
          "crd": lambda a, b, s: crd_loss(a, b, ti, tt, s, 0.7)}[name]
    assert torch.autograd.gradcheck(fn, (si, st, scale))


# ---- a student run ----------------------------------------------------------------------------------


def test_student_learns_the_distillation_losses_and_keeps_the_teacher_out(tmp_path, teacher):
    out = tmp_path / "student"
    assert train(out, f"distill.teachers=[{teacher}]", steps=12) == 0
    steps = [r for r in records(out) if r.get("event") != "eval"]
    for name in ALL:
        values = [r[f"loss/{name}"] for r in steps]
        assert len(values) == 12 and values[-1] < values[0], (name, values)
    assert all(r["teacher_flops_per_s"] > 0 for r in steps)
    weights = read_model(out / "checkpoints" / "step_00000012")
    assert weights["distill_proj.0.weight"].shape == (24, 16)  # the student's map to the teacher's width
    teacher_weights = read_model(teacher / "checkpoints" / "step_00000003")
    assert len(weights) == len(teacher_weights) + 1  # the student's own tensors and its map, no teacher's


def test_bad_teachers_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, teacher):
    vlm = tmp_path / "vlm"
    assert main(["train", "tiny", "--out", str(vlm), "--set", "train.steps=1", "--set", "train.ckpt_every=1",
                 "--set", "eval.splits=", "--set", "eval.tasks=", "--set", "train.progress=false"]) == 0
    capsys.readouterr()
    cases = [([f"distill.teachers=[{teacher}]", "distill.weights=[0.5]"], "distill.weights=[0.5] must be"),
             ([f"distill.teachers=[{teacher},{teacher}]", "distill.weights=[1.0]"], "distill.weights has 1 entries"),
             ([f"distill.teachers=[{teacher}]", "distill.losses=[fd,kd]"], "'kd' is not one of fd, icl, crd"),
             ([f"distill.teachers=[{vlm}]"], "is a model=vlm run, not a dual encoder"),
             ([f"distill.teachers=[{tmp_path / 'nowhere'}]"], "run directory not found"),
             ([f"distill.teachers=[{teacher}]", "vision.image_size=48", "vision.patch_size=8"], "reads images of size 24")]
    for sets, needle in cases:
        out = tmp_path / "run"
        assert train(out, *sets) == 2, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (sets, err)
        assert not out.exists()
    assert main(["train", "tiny", "--out", str(tmp_path / "tiny"), "--set", f"distill.teachers=[{teacher}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set distill.teachers" in err and "does not read" in err
    assert not (tmp_path / "tiny").exists()


def test_a_distill_setting_without_teachers_is_refused(tmp_path, capsys):
    from graft.cli import main

    assert main(["train", "clip", "--out", str(tmp_path / "run"), "--set", "distill.temperature=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.temperature has no effect without distill.teachers" in err[0]
    assert not (tmp_path / "run").exists()
