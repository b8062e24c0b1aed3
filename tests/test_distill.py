"""CLIP-KD distillation of a dual encoder from frozen dual-encoder teachers (graft/distill.py,
designs/dual.py, designs/dual_teachers.py): the three losses against their plain formulas and
gradcheck, a student run that learns them from a graft run or an HF CLIP/SigLIP folder, the teacher
kept out of the student, its images adapted and its text re-tokenised, bad settings refused in one
line."""

import json

import pytest
import torch
import torch.nn.functional as F

from hf_models import CLIP_MEAN, CLIP_STD, make_dual, make_lm

from graft.cli import main
from graft.distill import crd_loss, fd_loss_sum, icl_loss, kd_loss
from graft.models.teachers import ImagesAs
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


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A released-style CLIP folder reading 32 px images with CLIP's mean and std (the student: 24 px, 0.5)."""
    return make_dual("clip", tmp_path_factory.mktemp("hf") / "clip", image_size=32)


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


def test_kd_is_open_clips_soft_cross_entropy():
    """open_clip's DistillClipLoss.dist_loss on both directions, each model at its own scale."""
    si, st, ti, tt = unit(6, 8), unit(6, 8), unit(6, 12), unit(6, 12)
    s, t = torch.tensor(5.0, dtype=torch.float64), torch.tensor(20.0, dtype=torch.float64)

    def dist_loss(teacher_logits, logits):  # open_clip/loss.py, written out
        return -(teacher_logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    S, T = s * si @ st.T, t * ti @ tt.T
    expected = (dist_loss(T, S) + dist_loss(T.T, S.T)) / 2
    assert kd_loss(si, st, ti, tt, s, t).item() == pytest.approx(expected.item(), rel=1e-12)
    entropy = -(T.softmax(1) * T.log_softmax(1)).sum() / 12 - (T.T.softmax(1) * T.T.log_softmax(1)).sum() / 12
    crd = crd_loss(si, st, ti, tt, s, 1 / t.item())  # = crd at τ = 1/t plus the teacher's entropy
    assert kd_loss(si, st, ti, tt, s, t).item() == pytest.approx((crd + entropy).item(), rel=1e-10)
    tau = 3.0  # Hinton's temperature: both models' logits / τ, the loss × τ²
    hot = tau**2 * (dist_loss(T / tau, S / tau) + dist_loss(T.T / tau, S.T / tau)) / 2
    assert kd_loss(si, st, ti, tt, s, t, tau).item() == pytest.approx(hot.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["fd", "icl", "crd", "kd"])
def test_losses_pass_gradcheck_in_fp64(name):
    si, st = unit(4, 6).requires_grad_(), unit(4, 6).requires_grad_()
    ti, tt, scale = unit(4, 6), unit(4, 6), torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    fn = {"fd": lambda a, b, s: fd_loss_sum(a, ti) + fd_loss_sum(b, tt) + 0 * s,
          "icl": lambda a, b, s: icl_loss(a, b, ti, tt, s),
          "crd": lambda a, b, s: crd_loss(a, b, ti, tt, s, 0.7),
          "kd": lambda a, b, s: kd_loss(a, b, ti, tt, s, torch.tensor(9.0, dtype=torch.float64), 2.0)}[name]
    assert torch.autograd.gradcheck(fn, (si, st, scale))


# ---- a student run ----------------------------------------------------------------------------------


def learned(out, teacher, losses=ALL) -> dict:
    """A 12-step student of `teacher`: every distillation loss in `losses` fell, the teacher's FLOPs
    were logged apart; its checkpoint's tensors."""
    names = ",".join(name.removeprefix("distill_") for name in losses)
    assert train(out, f"distill.teachers=[{teacher}]", f"distill.losses=[{names}]", steps=12) == 0
    steps = [r for r in records(out) if r.get("event") != "eval"]
    for name in losses:
        values = [r[f"loss/{name}"] for r in steps]
        assert len(values) == 12 and values[-1] < values[0], (name, values)
    assert all(r["teacher_flops_per_s"] > 0 for r in steps)
    return read_model(out / "checkpoints" / "step_00000012")


def test_student_learns_the_distillation_losses_and_keeps_the_teacher_out(tmp_path, teacher):
    weights = learned(tmp_path / "student", teacher)
    assert weights["distill_proj.0.weight"].shape == (24, 16)  # the student's map to the teacher's width
    teacher_weights = read_model(teacher / "checkpoints" / "step_00000003")
    assert len(weights) == len(teacher_weights) + 1  # the student's own tensors and its map, no teacher's


def test_bad_teachers_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, teacher, hf_clip):
    vlm = tmp_path / "vlm"
    assert main(["train", "tiny", "--out", str(vlm), "--set", "train.steps=1", "--set", "train.ckpt_every=1",
                 "--set", "eval.splits=", "--set", "eval.tasks=", "--set", "train.progress=false"]) == 0
    llama = make_lm("llama", tmp_path / "llama")
    capsys.readouterr()
    cases = [([f"distill.teachers=[{teacher}]", "distill.weights=[0.5]"], "distill.weights=[0.5] must be"),
             ([f"distill.teachers=[{teacher},{teacher}]", "distill.weights=[1.0]"], "distill.weights has 1 entries"),
             ([f"distill.teachers=[{teacher}]", "distill.losses=[fd,kl]"], "'kl' is not one of fd, icl, crd, kd"),
             ([f"distill.teachers=[{teacher}]", "distill.losses=[fd]", "distill.temperature=2"], "read by crd and kd only"),
             ([f"distill.teachers=[{vlm}]"], "is a model=vlm run, not a dual encoder"),
             ([f"distill.teachers=[{tmp_path / 'nowhere'}]"], "run directory not found"),
             ([f"distill.teachers=[{llama}]"], "is an HF 'llama' model"),
             ([f"distill.teachers=[{hf_clip}]", "contrastive.shared_tower=true"], "reads text as token ids")]
    for sets, needle in cases:
        out = tmp_path / "run"
        assert train(out, *sets) == 2, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (sets, err)
        assert not out.exists()
    assert main(["train", "tiny", "--out", str(tmp_path / "tiny"), "--set", f"distill.teachers=[{teacher}]"]) == 2
    err = capsys.readouterr().err.strip()  # a VLM reads distill.teachers too, but its teachers are VLMs
    assert len(err.splitlines()) == 1 and "is a model=dual run, not a VLM" in err
    assert not (tmp_path / "tiny").exists()
    assert main(["train", "shapes_fuyu", "--out", str(tmp_path / "fuyu"), "--set", f"distill.teachers=[{teacher}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set distill.teachers" in err and "does not read" in err


def test_a_distill_setting_without_teachers_is_refused(tmp_path, capsys):
    from graft.cli import main

    assert main(["train", "clip", "--out", str(tmp_path / "run"), "--set", "distill.temperature=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.temperature has no effect without distill.teachers" in err[0]
    assert not (tmp_path / "run").exists()


# ---- teachers of another kind: HF folders, other image settings ---------------------------------


def test_images_as_reads_pixels_the_teachers_way():
    mine, clip = (24, [0.5] * 3, [0.5] * 3), (24, CLIP_MEAN, CLIP_STD)
    x = torch.rand(2, 3, 24, 24)  # [0, 1]
    student = (x - 0.5) / 0.5
    assert ImagesAs(mine, mine)(student) is student  # the same settings: untouched
    want = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(ImagesAs(clip, mine)(student), want)
    flat = torch.full((1, 3, 24, 24), 0.3)  # a plain colour stays that colour at another size
    bigger = ImagesAs((40, [0.5] * 3, [0.5] * 3), mine)((flat - 0.5) / 0.5)
    assert bigger.shape == (1, 3, 40, 40)
    torch.testing.assert_close(bigger, torch.full_like(bigger, (0.3 - 0.5) / 0.5))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_an_hf_teacher_embeds_as_its_own_model_does(tmp_path, kind):
    """The teacher's text embeddings of the student's token ids are the HF model's of the caption
    itself (decoded, re-tokenised its way); its image embeddings of the student's pixels are the HF
    model's of the pixels normalised its way."""
    from transformers import AutoModel, AutoTokenizer

    from graft.build import processor_for
    from graft.data.world_source import make_world
    from graft.designs.dual_teachers import teacher
    from graft.recipes import recipe

    folder = make_dual(kind, tmp_path / kind, image_size=24)
    cfg = recipe("clip", [f"distill.teachers=[{folder}]"])
    proc = processor_for(cfg)
    samples = [make_world(cfg).sample("test", i) for i in range(4)]
    ids = torch.tensor([proc.text_ids(s.caption) for s in samples])
    pixels = torch.stack([proc.pixels(s.image) for s in samples])
    (image, text, scale, patches), = teacher(cfg, None, proc.tok)({"input_ids": ids, "pixel_values": pixels})
    assert patches is None  # read only for the dense loss

    hf, tok = AutoModel.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    padding = "max_length" if kind == "siglip" else "longest"
    enc = tok([s.caption for s in samples], padding=padding, max_length=hf.config.text_config.max_position_embeddings,
              truncation=True, return_tensors="pt")
    args = {"input_ids": enc["input_ids"]} | ({} if kind == "siglip" else {"attention_mask": enc["attention_mask"]})
    features = lambda out: F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)  # noqa: E731
    torch.testing.assert_close(text, features(hf.get_text_features(**args)))
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ([0.5] * 3, [0.5] * 3)
    theirs = (pixels * 0.5 + 0.5 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(image, features(hf.get_image_features(pixel_values=theirs)))
    assert scale.item() == pytest.approx(hf.logit_scale.exp().item())  # kd's teacher logits use its own scale


def test_student_learns_from_an_hf_teacher_at_another_image_size(tmp_path, hf_clip):
    weights = learned(tmp_path / "student", hf_clip, [*ALL, "distill_kd"])  # kd: the HF model's own logit scale
    assert weights["distill_proj.0.weight"].shape == (20, 16)  # to the HF model's projection width
    assert not any("teacher" in k or k.startswith("model.") for k in weights)


def test_a_graft_teacher_with_other_image_settings_is_adapted(tmp_path):
    """A teacher run on 32 px images normalised another way teaches a 24 px student (refused before)."""
    big = tmp_path / "big"
    assert train(big, "vision.image_size=32", "vision.image_mean=[0.4,0.4,0.4]", "vision.image_std=[0.3,0.3,0.3]",
                 embed=24, steps=2) == 0
    out = tmp_path / "student"
    assert train(out, f"distill.teachers=[{big}]", steps=2) == 0
    assert all(r["loss/distill_fd"] > 0 for r in records(out) if "loss/distill_fd" in r)


def test_a_graft_teachers_logit_scale_is_its_trained_one(teacher):
    """kd reads the teacher's own scale: loaded from its checkpoint, not left at initialisation."""
    from graft.designs.dual_teachers import teacher as teachers
    from graft.recipes import recipe
    from graft.rundir import RunDir

    cfg = recipe("clip", [*SMALL[1::2], "contrastive.embed_dim=16", f"distill.teachers=[{teacher}]"])
    pixels, ids = torch.zeros(2, 3, 24, 24), torch.zeros(2, cfg.text.max_len, dtype=torch.long)
    (_, _, scale, _), = teachers(cfg, None, RunDir(teacher).tokenizer())({"input_ids": ids, "pixel_values": pixels})
    trained = read_model(teacher / "checkpoints" / "step_00000003")["logit_scale"]
    assert scale.item() == pytest.approx(trained.exp().item(), rel=1e-6)
    assert abs(trained.item() - torch.tensor(1 / 0.07).log().item()) > 1e-4  # it moved in training
