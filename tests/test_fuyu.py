"""Fuyu (graft/models/fuyu.py): patches as HF's Fuyu processor cuts them, the whole model equal to
HF `FuyuForCausalLM` (with a Llama text model) on the same weights, the rows of placeholders with
their newlines, and a short run that learns from the images."""

import json

import pytest
import torch

from graft.build import step_losses
from graft.cli import main
from graft.data.processor import Processor
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import LMConfig
from graft.models.fuyu import Patches, patchify
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM
from tests.helpers import tokenizer, world_batches


def tiny_fuyu() -> tuple[VLM, Processor]:
    tok = tokenizer()
    vision = VisionConfig(image_size=24, patch_size=8)
    lm = LMConfig(vocab_size=len(tok), hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)
    model = VLM(Patches(vision), ConnectorConfig("linear"), lm, tok.image)
    return model.eval(), Processor(tok, 24, model.num_image_tokens, 128, image_row=3)


def test_patches_are_cut_as_hf_fuyu_cuts_them():
    """HF `FuyuImageProcessor.patchify_image`'s steps (unfold rows, then columns; channels last),
    written out here: that class needs torchvision, which graft does not install."""
    pixels = torch.randn(2, 3, 24, 32)
    patches = pixels.unfold(2, 8, 8).unfold(3, 8, 8).contiguous().view(2, 3, -1, 8, 8)
    theirs = patches.permute(0, 2, 3, 4, 1).reshape(2, -1, 3 * 8 * 8)
    assert torch.equal(patchify(pixels, 8), theirs)
    assert torch.equal(patchify(pixels, 8)[1, 5], pixels[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))  # row 1, col 1


def test_each_row_of_patches_ends_with_a_newline():
    model, proc = tiny_fuyu()
    tok = proc.tok
    ids = proc.prompt("what is it?")
    newline = tok.encode("\n")[0]
    start = ids.index(tok.image)
    assert ids[start:start + 12] == ([tok.image] * 3 + [newline]) * 3
    assert ids.count(tok.image) == model.num_image_tokens == 9


def test_a_records_rows_of_placeholders_are_checked_row_by_row():
    """`samples.encode` checks Fuyu's rows of placeholders (each ended by a newline) as rows: a whole
    image passes, two images pass, a row one short is a named skip."""
    from graft.data.samples import BadSample, check_placeholders, encode

    _, proc = tiny_fuyu()
    ids, labels, _ = encode(proc, [("what is it?", "a circle")])
    assert labels.count(-100) < len(labels)
    two, _, _ = encode(proc, [("first", "a"), ("second", "b")], [(0, 0), (1, 0)])
    check_placeholders(two, proc.tok.image, 9, 2, row=3)
    short = list(ids)
    del short[short.index(proc.tok.image)]
    with pytest.raises(BadSample, match="image row 0: 2 placeholders found, 3 expected"):
        check_placeholders(short, proc.tok.image, 9, 1, row=3)
    with pytest.raises(BadSample, match="3 rows of 3 placeholders for 2 images"):
        check_placeholders(ids, proc.tok.image, 9, 2, row=3)


def test_fuyu_reads_a_users_shards(tmp_path):
    """Every record of a user's shards is usable by Fuyu (its rows of placeholders used to fail the
    record check, so every streamed record was skipped as placeholder_mismatch)."""
    from graft.config_checks import apply_overrides
    from graft.data.check import check_data, processor_for
    from graft.data.export import export_shapes
    from graft.recipes import recipe

    cfg = recipe("shapes_fuyu", ["lm.hidden_size=32", "lm.layers=2", "lm.intermediate_size=64"])
    sets = export_shapes(cfg, "webdataset", tmp_path, 24)
    cfg = apply_overrides(cfg, sets)
    result = check_data(cfg, processor_for(cfg), 24)
    assert (result.used, result.read, dict(result.skipped)) == (24, 24, {})


def test_matches_transformers_fuyu_for_causal_lm():
    """The whole model is HF `FuyuForCausalLM` (Llama text model) on the same weights, loaded
    strictly: every key of theirs comes from ours and every weight of ours goes somewhere. Every
    RMSNorm's scale is randomised first (they are 1 at init), so a norm read in the wrong place fails."""
    from transformers import FuyuConfig, FuyuForCausalLM

    from graft.models.hf import llama_config

    torch.manual_seed(0)
    model, proc = tiny_fuyu()
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert len(norms) == 2 * 2 + 1 and all(n.endswith(".weight") for n in norms)  # 2 per layer + final; no biases
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norms:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    config = FuyuConfig(text_config=llama_config(model.lm.cfg).to_dict(), image_size=24, patch_size=8,
                        image_token_id=proc.tok.image)
    config.text_config._attn_implementation = config._attn_implementation = "sdpa"
    hf = FuyuForCausalLM(config).eval()
    lm = {k: v for k, v in model.lm.state_dict().items() if not k.startswith("lm_head")}
    weights = {**{f"model.language_model.{k}": v for k, v in lm.items()}, "lm_head.weight": model.lm.lm_head.weight,
               "model.vision_embed_tokens.weight": model.connector.linear_1.weight,
               "model.vision_embed_tokens.bias": model.connector.linear_1.bias}
    assert len(weights) == len(model.state_dict())  # ours all mapped (Patches holds no weights)
    hf.load_state_dict(weights, strict=True)  # theirs all filled
    convs = [proc.conversation([("what color is the circle?", "red")]) for _ in range(2)]
    ids = torch.tensor([c[0] for c in convs])
    pixels = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ours = model(ids, pixels)[0]
        theirs = hf(input_ids=ids, image_patches=patchify(pixels, 8)).logits
    # Logits are O(1); the two sides differ by fp32 summation order in matmuls and SDPA only
    # (~1e-6 on any x86 BLAS): 1e-5 leaves 10x room, far below what a misplaced weight does (>1e-2).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fuyu_reads_no_vision_encoder_setting(tmp_path, capsys):
    assert main(["train", "shapes_fuyu", "--out", str(tmp_path / "run"), "--set", "vision.layers=2"]) == 2
    err = capsys.readouterr().err
    assert "vision.layers has no effect with model=fuyu" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_short_fuyu_run_learns_from_the_images(tmp_path):
    """`graft train shapes_fuyu` from scratch, one object per image, 100 steps: colour and size far
    above what the text alone allows (test-split ceilings 1/5 and 1/2: one colour of each shape is
    held out for the compositional split; a blank-image shapes_vqa run got 0.14 and 0.54). Measured
    (one thread, Intel Xeon, train.seed 0 / 1 / 2): colour 1.00 / 0.94 / 0.98, size 0.94 / 0.94 /
    0.88 (seed 0's shape: 0.52, 0.92 at 150 steps). At half width seeds 0 and 2 stay near the
    colour ceiling (0.36, 0.42): the full-width recipe is what this checks."""
    out = tmp_path / "run"
    sets = ["train.steps=100", "train.batch_size=32", "train.progress=false", "train.log_every=50",
            "train.ckpt_every=100", "data.max_objects=1", "eval.vqa_per_type=50", "eval.captions=0", "eval.splits=[test]"]
    assert main(["train", "shapes_fuyu", "--out", str(out)] + [a for s in sets for a in ("--set", s)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["vqa_acc/color"] >= 0.6 and result["vqa_acc/size"] >= 0.8, result


def test_eve_alignment_to_a_frozen_teacher(tmp_path):
    """eve.teacher: a named loss `align` (cosine distance of the LM's patch states, through a head,
    to the teacher's patch features) that training lowers, weighed by train.objectives; the teacher
    is not trained and not saved."""
    from graft.build import load_run
    from graft.rundir import RunDir
    from graft.trainer.checkpoint import read_model

    small = [f"lm.{k}={v}" for k, v in (("hidden_size", 32), ("layers", 2), ("intermediate_size", 64))]
    quiet = ["train.progress=false", "train.log_every=1", "eval.splits="]
    teacher = tmp_path / "teacher"
    assert main(["train", "tiny", "--out", str(teacher), "--set", "train.steps=2", "--set", "train.progress=false",
                 "--set", "eval.splits="]) == 0
    run = tmp_path / "eve"
    sets = [*small, *quiet, "train.steps=12", f"eve.teacher={teacher}", "train.objectives={lm: 1, align: 2}"]
    assert main(["train", "shapes_fuyu", "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    align = [r["loss/align"] for r in steps if "loss/align" in r]
    assert len(align) == 12 and align[-1] < align[0]
    assert all(r["teacher_flops_per_s"] > 0 for r in steps if "loss" in r)  # logged apart from the model's
    saved = read_model(RunDir(str(run)).latest_checkpoint())
    assert "align_head.weight" in saved and not any(k.startswith(("_teacher", "teacher")) for k in saved)
    cfg, tok, model, _ = load_run(RunDir(str(run)))
    assert not any("teacher" in name for name, _ in model.named_modules())  # the trainer holds it, not the model
    held = step_losses(cfg, model, tok).teacher.module
    teacher_model = load_run(RunDir(str(teacher)))[2]
    assert all(torch.equal(p, q) for p, q in zip(held.parameters(), teacher_model.vision.parameters()))
    assert not any(p.requires_grad for p in held.parameters()) and not held.training


def test_align_is_no_loss_without_a_teacher(tmp_path, capsys):
    assert main(["train", "shapes_fuyu", "--out", str(tmp_path / "r"), "--set", "train.objectives={align: 1}"]) == 2
    assert "'align' is not a loss of model=fuyu" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_eve_teacher_from_a_hugging_face_folder(tmp_path, kind):
    """eve.teacher = a local SiglipVisionModel / CLIPVisionModel folder: its patch features (CLIP's
    class token left out) are the target; it is frozen and not saved."""
    from hf_models import make_vision

    from graft.build import load_run
    from graft.rundir import RunDir
    from graft.trainer.checkpoint import read_model

    folder = make_vision(kind, tmp_path / kind)
    small = [f"lm.{k}={v}" for k, v in (("hidden_size", 32), ("layers", 2), ("intermediate_size", 64))]
    sets = [*small, "train.progress=false", "train.log_every=1", "eval.splits=", "train.steps=8",
            "train.batch_size=16", f"eve.teacher={folder}", "train.objectives={lm: 1, align: 2}"]
    run = tmp_path / "eve"
    assert main(["train", "shapes_fuyu", "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    align = [r["loss/align"] for r in records if "loss/align" in r]
    assert len(align) == 8 and all(0 <= a <= 2 for a in align) and align[-1] < align[0]
    saved = read_model(RunDir(str(run)).latest_checkpoint())
    assert not any("teacher" in k for k in saved)
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(str(folder)).state_dict()
    cfg, tok, model, _ = load_run(RunDir(str(run)))
    held = step_losses(cfg, model, tok).teacher
    mine = {k.removeprefix("model."): v for k, v in held.module.state_dict().items()}
    assert set(reference) <= set(mine) and all(torch.equal(mine[k], v) for k, v in reference.items())
    # the teacher reads the images normalised its own way (CLIP's mean and std, SigLIP's 0.5)
    from graft.parts import load_teacher

    _, seen_as = load_teacher(str(folder))
    pixels = torch.rand(2, 3, seen_as.image_size, seen_as.image_size)
    own = (pixels - 0.5) / 0.5  # the student's
    want = (pixels - torch.tensor(seen_as.image_mean)[:, None, None]) / torch.tensor(seen_as.image_std)[:, None, None]
    torch.testing.assert_close(held({"pixel_values": own}), held.module.features(want))
    assert (seen_as.image_mean != [0.5] * 3) == (kind == "clip")


def test_the_trainers_align_objective_is_evees_cosine_distance(tmp_path):
    """The `align` objective the trainer composes (student outputs, teacher outputs) equals the
    alignment computed by hand: the LM layer's output (read with a hook here) at the image tokens,
    through the head, against the frozen CLIP tower's features of the images renormalised to its
    mean and std; the counts are the image tokens, and the model's own `lm` loss is unchanged."""
    from hf_models import CLIP_MEAN, CLIP_STD, make_vision

    from graft.build import assemble, build_processor, tokenizer_for
    from graft.losses import batch_loss
    from graft.recipes import recipe

    folder = make_vision("clip", tmp_path / "clip")
    cfg = recipe("shapes_fuyu", ["lm.hidden_size=32", "lm.layers=2", "lm.intermediate_size=64",
                                 f"eve.teacher={folder}", "eve.layer=0", "train.batch_size=8"])
    tok = tokenizer_for(cfg)
    model = assemble(cfg, tok)
    batch = world_batches(cfg, build_processor(cfg, tok, model)).batch(0, 0)
    composed = step_losses(cfg, model, tok)
    seen = {}
    hook = model.lm.layers[0].register_forward_hook(lambda m, args, out: seen.setdefault("h", out))
    losses = composed.losses(model, batch)
    hook.remove()
    image = batch["input_ids"] == model.image_token_id
    student = model.align_head(seen["h"][image])
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    pixels = batch["pixel_values"] * 0.5 + 0.5  # the student's normalisation undone (mean = std = 0.5)
    target = composed.teacher.module.features((pixels - mean[:, None, None]) / std[:, None, None])
    want = (1 - torch.nn.functional.cosine_similarity(student, target.reshape(student.shape), dim=-1)).sum()
    torch.testing.assert_close(losses["align"], want)
    assert composed.counts(batch)["align"] == int(image.sum()) > 0
    torch.testing.assert_close(losses["lm"], batch_loss(model, batch) * model.loss_counts(**batch)["lm"])

    # FLOPs: the teacher's forward is counted apart, and the model's training FLOPs leave it out
    from torch.utils.flop_counter import FlopCounterMode

    from graft.losses import weighted
    from graft.trainer.flops import _CPU_ATTENTION, MeasuredFlops

    counter = MeasuredFlops()
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as alone:
        composed.teach(batch)
    assert counter.teacher(composed, [batch]) == alone.get_total_flops() > 0
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as both:
        weighted(composed.losses(model, batch), composed.counts(batch)).backward()
    model.zero_grad(set_to_none=True)
    assert counter(model, batch, composed) == both.get_total_flops() - alone.get_total_flops()
