"""`graft export --format hf`: the folder loads in transformers without weight warnings, its
processor builds graft's inputs, its logits and greedy answers equal graft's, and importing it
back (`train.init_from=OUT`) restores the weights exactly. A tiny run is trained in the test."""

import json
import logging

import pytest
import torch
from graft.trainer.checkpoint import read_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from graft.cli import main
from graft.data.world_source import make_world
from graft.build import build_processor, load_run
from graft.rundir import RunDir

STEPS = 60  # enough for the tiny model to answer with words, not just <eos>
TOL = 1e-4


def graft_cli(*args):
    """The CLI in this process; it must succeed."""
    assert main(list(args)) == 0


def tiny_settings(steps: int) -> list[str]:
    sets = [f"train.steps={steps}", "train.progress=false", f"train.ckpt_every={steps}", "eval.vqa_per_type=2",
            "eval.captions=2", "eval.splits=[test]", "optim.warmup_steps=5", "optim.lr=3e-3"]
    return [a for s in sets for a in ("--set", s)]


def _export(root):
    graft_cli("train", "tiny", "--out", str(root / "run"), *tiny_settings(STEPS))
    graft_cli("export", str(root / "run"), "--format", "hf", "--out", str(root / "hf"))


@pytest.fixture
def exported(shared_run):
    """The tiny run and its export, made once per session (conftest's `shared_run`) whichever xdist
    worker asks first; the tests only read both."""
    root = shared_run("hf_export_tiny", _export)
    return root / "run", root / "hf"


def load_hf(out):
    """Model and processor, with every transformers warning (missing/unexpected weights...) captured."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
        processor = AutoProcessor.from_pretrained(str(out))
    finally:
        logger.removeHandler(handler)
    return model.eval(), processor, info, [r.getMessage() for r in records]


def hf_inputs(processor, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def test_export_loads_cleanly_and_matches_graft(exported):
    run, out = exported
    hf, processor, info, warnings = load_hf(out)
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not [w for w in warnings if "weight" in w.lower() or "key" in w.lower()], warnings
    assert type(processor).__name__ == "LlavaProcessor"

    cfg, tok, model, _ = load_run(RunDir(run))
    proc = build_processor(cfg, tok, model)
    world = make_world(cfg)
    for index in range(3):
        sample = world.sample("test", index)
        question = sample.qa[0].question
        inputs = hf_inputs(processor, sample.image, question)
        ids, pixels = torch.tensor([proc.prompt(question)]), proc.pixels(sample.image)[None]
        assert torch.equal(inputs["input_ids"], ids)  # same chat layout, same placeholders
        assert (inputs["pixel_values"] - pixels).abs().max() <= 1e-6  # same resize and normalisation
        with torch.no_grad():
            ours, _ = model(ids, pixels)
            theirs = hf(**inputs).logits
        assert (ours - theirs).abs().max().item() <= TOL


def test_hf_generate_gives_the_graft_generate_answer(exported, tmp_path, capsys):
    run, out = exported
    hf, processor, _, _ = load_hf(out)
    world = make_world(RunDir(run).config())
    answers = []
    for index in range(2):
        sample = world.sample("test", index)
        image_path = tmp_path / f"{index}.png"
        sample.image.save(image_path)
        question = sample.qa[0].question
        capsys.readouterr()
        graft_cli("generate", str(run), "--image", str(image_path), "--prompt", question, "--max-new-tokens", "12")
        cli = capsys.readouterr().out.strip()
        inputs = hf_inputs(processor, sample.image, question)
        new = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        theirs = processor.decode(new, skip_special_tokens=True).strip()
        assert theirs == cli, (question, theirs, cli)
        answers.append(cli)
    assert any(answers), "the tiny run should answer with at least one word"


def test_import_back_round_trips_exactly(exported, tmp_path):
    run, out = exported
    again = tmp_path / "again"
    # lr 0: the one step changes no weight, so the checkpoint holds exactly what was imported.
    graft_cli("train", "tiny", "--out", str(again), *tiny_settings(1), "--set", f"train.init_from={out}",
              "--set", "optim.lr=0")
    before = read_model(RunDir(run).latest_checkpoint())
    after = read_model(RunDir(again).latest_checkpoint())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    vocab = lambda d: json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]  # noqa: E731
    assert vocab(again) == vocab(run)  # the exported tokenizer was picked up


def test_export_refuses_a_non_empty_out_and_a_bad_format(exported, tmp_path, capsys):
    run, out = exported
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "onnx" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["linear_connector", "gpt2_clip", "llama_siglip_layer0"])
def test_export_variants_match_and_round_trip(variant, tmp_path):
    """Untrained variants, in process: a linear connector (LLaVA's projector with an identity
    linear_2), GPT-2 (exported untied: LLaVA ties by the name embed_tokens) with a CLIP tower (class
    token dropped, CLIP mean/std), and an early vision feature layer."""
    from hf_models import make_lm, make_vision

    from graft.data.hf_tokenizer import HFChatTokenizer
    from graft.export import hf_processor
    from graft.models.hf_llava import load_llava_weights, to_llava
    from graft.recipes import tiny
    from graft.build import build_model, load_run, resolve_backbones
    from helpers import tokenizer

    cfg = tiny()
    if variant == "linear_connector":
        cfg.connector.kind, tok = "linear", tokenizer()
    else:
        lm, vision = variant.split("_")[:2]
        cfg.lm.hf_path = str(make_lm(lm, tmp_path / lm))
        cfg.vision.hf_path = str(make_vision(vision, tmp_path / vision))
        cfg.vision.feature_layer = 0 if variant.endswith("layer0") else -1
        tok = HFChatTokenizer.load(cfg.lm.hf_path)
        resolve_backbones(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    out = tmp_path / "hf"
    to_llava(model, cfg, tok).save_pretrained(str(out))
    hf_processor(cfg, tok, model).save_pretrained(str(out))
    hf, processor, info, warnings = load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not [w for w in warnings if "weight" in w.lower()], warnings

    proc = build_processor(cfg, tok, model)
    image = make_world(cfg).sample("test", 0).image
    question = "what color is the circle?"
    text = proc.prompt_text(question) if variant != "linear_connector" else \
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                      add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ids, pixels = torch.tensor([proc.prompt(question)]), proc.pixels(image)[None]
    assert torch.equal(inputs["input_ids"], ids)
    assert (inputs["pixel_values"] - pixels).abs().max() <= 1e-6
    with torch.no_grad():
        assert (model(ids, pixels)[0] - hf(**inputs).logits).abs().max().item() <= TOL

    torch.manual_seed(1)
    again = build_model(cfg, tok, pretrained=False)
    load_llava_weights(again, out)
    mine, theirs = model.state_dict(), again.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
