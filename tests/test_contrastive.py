"""Dual encoders (CLIP, SigLIP, CLIPPO, LiT): model behaviour, zero-shot/retrieval maths, bad input,
and the chain "contrastive run → VLM vision tower" through the CLI."""

import json

import numpy as np
import pytest
import torch

from graft.data.contrastive import ContrastiveProcessor
from graft.data.render import render_text
from graft.errors import UserError
from graft.eval.retrieval import recall_at_k
from graft.eval.zero_shot import TEMPLATES, check_prompts, load_prompts
from graft.losses import batch_loss
from graft.models.dual_encoder import ContrastiveConfig, DualEncoder
from graft.models.text_encoder import TextConfig
from graft.models.vit import VisionConfig
from graft.data.shapes import CLASSES, ShapesWorld
from graft.rundir import RunDir
from graft.trainer.checkpoint import read_model
from tests.helpers import cli, one_line_error, tokenizer
from tests.scoring import direct_zero_shot

VISION = VisionConfig(image_size=24, patch_size=8, hidden_size=32, layers=1, heads=2, intermediate_size=64)


def tiny_dual(loss="siglip", causal=False, pool="last", shared=False):
    tok = tokenizer()
    text = TextConfig(vocab_size=len(tok), max_len=12, hidden_size=32, layers=1, heads=2, intermediate_size=64,
                      causal=causal, pool=pool)
    model = DualEncoder(VISION, text, ContrastiveConfig(loss=loss, embed_dim=16, shared_tower=shared), tok.eos)
    return model, ContrastiveProcessor(tok, 24, 12, render=shared)


@pytest.mark.parametrize("loss,shared", [("clip", False), ("siglip", False), ("siglip", True)])
def test_forward_gives_unit_embeddings_a_finite_loss_and_gradients_everywhere(loss, shared):
    model, proc = tiny_dual(loss, shared=shared)
    from PIL import Image

    images = [Image.new("RGB", (24, 24), (40 * i, 0, 0)) for i in range(4)]
    batch = proc.pairs(images, ["a small red circle", "a large blue cross", "a red square", "a white cross"])
    (img, txt), _ = model(**batch)
    value = batch_loss(model, batch)
    assert img.shape == txt.shape == (4, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.isfinite(value)
    value.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_paper_initial_temperature_and_bias():
    clip, _ = tiny_dual("clip")
    sig, _ = tiny_dual("siglip")
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP §2.5
    assert sig.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-5)  # SigLIP §3.3
    assert sig.logit_bias.item() == -10.0 and not hasattr(clip, "logit_bias")


def test_clip_text_tower_pools_at_eos_and_ignores_what_follows():
    model, proc = tiny_dual("clip", causal=True, pool="eos")
    ids = torch.tensor([proc.text_ids("a red circle")])
    eos_at = ids[0].tolist().index(proc.tok.eos)
    changed = ids.clone()
    changed[0, eos_at + 1:] = 7  # different tokens after <eos>: causal attention never sees them
    base = model.encode_text(ids)
    assert torch.allclose(base, model.encode_text(changed), atol=1e-6)
    changed[0, 0] = 9  # a different first word must change the embedding
    assert not torch.allclose(base, model.encode_text(changed), atol=1e-4)


def test_lit_freezes_the_image_tower_only():
    model, _ = tiny_dual()
    model.freeze(["vision"])
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.image_proj.parameters())


def test_text_is_truncated_keeping_eos_and_rendered_text_is_ink_on_white():
    _, proc = tiny_dual()
    ids = proc.text_ids("a small red circle, " * 10)
    assert len(ids) == 12 and ids[-1] == proc.tok.eos
    img = render_text("a red circle", 48)
    pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32))
    assert pixels.max() == 255 and pixels.min() < 100  # white canvas with dark glyphs


@pytest.mark.parametrize("text", ["a small yellow triangle, a small yellow triangle, a small yellow triangle and "
                                  "a small purple triangle", "triangle" * 5])
def test_rendered_text_stays_inside_the_canvas(text):
    """The longest Shapes caption (4 objects) is drawn whole; a word wider than a line is broken, not cut."""
    ink = np.argwhere(np.asarray(render_text(text, 48).convert("L")) < 128)  # (row, col) of dark pixels
    assert ink[:, 0].max() < 47 and ink[:, 1].max() < 47  # the lowest and rightmost ink is inside
    if "," in text:  # all 8 wrapped lines are there: ink reaches the canvas's lower part
        assert ink[:, 0].max() > 36


def test_recall_at_k_counts_identical_texts_as_correct():
    sims = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.2, 0.1], [0.5, 0.4, 0.3]])
    same = torch.eye(3, dtype=torch.bool)
    r = recall_at_k(sims, same)
    assert r[1] == pytest.approx(1 / 3) and r[5] == pytest.approx(1.0)  # top-1 per row: 1, 1, 0
    same[0, 1] = same[1, 0] = True  # texts 0 and 1 are the same caption
    assert recall_at_k(sims, same)[1] == pytest.approx(2 / 3)


def test_prompt_file_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="empty"):
        check_prompts([], TEMPLATES, "x")
    with pytest.raises(UserError, match="has no"):
        check_prompts(["a"] * 24, ["a photo"], "x")
    with pytest.raises(UserError, match="not found"):
        load_prompts(str(tmp_path / "nope.yaml"))
    good = tmp_path / "p.yaml"
    good.write_text("templates: ['a photo of a {}.', 'a {}']\n")
    classes, templates = load_prompts(str(good))
    assert len(classes) == 24 and templates == ["a photo of a {}.", "a {}"]


@pytest.mark.parametrize("setting,needle", [
    ("eval.zeroshot_file={missing}", "file not found"),
    ("eval.zeroshot_file={empty}", "class list is empty"),
    ("eval.zeroshot_file={notemplate}", "has no '{}'"),
    ("contrastive.loss=triplet", "contrastive.loss"),
])
def test_bad_contrastive_input_is_one_line_and_exit_2(tmp_path, setting, needle, capsys):
    files = {"missing": tmp_path / "missing.yaml", "empty": tmp_path / "empty.yaml", "notemplate": tmp_path / "t.yaml"}
    files["empty"].write_text("classes: []\n")
    files["notemplate"].write_text("templates: ['a photo of a thing']\n")
    one_line_error(cli(capsys, "train", "siglip", "--out", tmp_path / "run", "--set", setting.format(**files)), needle)
    assert not (tmp_path / "run").exists()


TINY = ["--set", "vision.hidden_size=32", "--set", "vision.layers=1", "--set", "vision.intermediate_size=64",
        "--set", "text.hidden_size=32", "--set", "text.layers=1", "--set", "text.intermediate_size=64",
        "--set", "train.batch_size=32", "--set", "train.log_every=5", "--set", "train.progress=false",
        "--set", "eval.zeroshot_images=48", "--set", "eval.retrieval_pairs=48", "--set", "eval.splits=[test]"]


def test_contrastive_run_then_vlm_on_its_vision_tower(tmp_path, capsys):
    run, vlm = tmp_path / "siglip", tmp_path / "vlm"
    code, _, err = cli(capsys, "train", "siglip", "--out", run, "--set", "train.steps=10", "--set", "train.ckpt_every=10", *TINY)
    assert code == 0, err
    results = json.loads((run / "eval.json").read_text())
    # the run's zero-shot figure is what its two encoders give, computed here (tests/scoring.py);
    # a near tie may order differently batched and one at a time: one image of 48 is 0.021
    cfg = RunDir(run).config()
    single = ShapesWorld(cfg.vision.image_size, cfg.data.grid, max_objects=1, seed=cfg.data.seed)
    samples = [single.sample("test", i) for i in range(48)]
    direct = direct_zero_shot(run, [s.image for s in samples], [s.label for s in samples], CLASSES, TEMPLATES)
    assert results["zeroshot_acc"] == pytest.approx(direct["zeroshot_acc"], abs=0.021), (results, direct)
    assert results["zeroshot_top5"] == pytest.approx(direct["zeroshot_top5"], abs=0.021), (results, direct)
    assert results["i2t_r@1"] <= results["i2t_r@5"] <= results["i2t_r@10"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e.get("event") == "eval"][-1]["zeroshot_acc"] == results["zeroshot_acc"]
    assert all(k in events[0] for k in ("loss", "samples_per_s", "mfu"))

    # The VLM takes the tower's architecture and weights; frozen, they stay the contrastive run's.
    code, _, err = cli(capsys, "train", "tiny", "--out", vlm, "--set", f"vision.init_from={run}", "--set",
                       "train.freeze=[vision]", "--set", "train.steps=2", "--set", "train.ckpt_every=2",
                       "--set", "eval.vqa_per_type=2", "--set", "eval.captions=0", "--set", "eval.splits=[test]",
                       "--set", "train.progress=false")
    assert code == 0, err
    src = read_model(run / "checkpoints" / "step_00000010")
    dst = read_model(vlm / "checkpoints" / "step_00000002")
    vision_keys = [k for k in src if k.startswith("vision.")]
    assert vision_keys and all(torch.equal(src[k], dst[k]) for k in vision_keys)

    # LiT locks the run's whole image side (tower, pooling head, projection) and trains the text tower.
    lit = tmp_path / "lit"
    code, _, err = cli(capsys, "train", "lit", "--out", lit, "--set", f"vision.init_from={run}", "--set", "train.steps=2",
                       "--set", "train.ckpt_every=2", *TINY)
    assert code == 0, err
    dst = read_model(lit / "checkpoints" / "step_00000002")
    image_keys = [k for k in src if k.startswith(("vision.", "image_pool.", "image_proj."))]
    assert any(k.startswith("image_proj.") for k in image_keys) and all(torch.equal(src[k], dst[k]) for k in image_keys)
    assert not all(torch.equal(src[k], dst[k]) for k in src if k.startswith("text."))
    # A locked head of another width is named in one line, not a load_state_dict traceback.
    one_line_error(cli(capsys, "train", "lit", "--out", tmp_path / "lit64", "--set", f"vision.init_from={run}",
                       "--set", "contrastive.embed_dim=64", "--set", "train.steps=2", *TINY), "image_proj.weight of shape")

    # graft eval re-scores the run to the same figures; generate refuses a model that cannot generate.
    assert cli(capsys, "eval", run)[0] == 0
    assert json.loads((run / "eval.json").read_text()) == results
    from PIL import Image

    Image.new("RGB", (24, 24)).save(tmp_path / "x.png")
    one_line_error(cli(capsys, "generate", run, "--image", tmp_path / "x.png", "--prompt", "hi"), "")
