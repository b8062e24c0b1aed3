"""The spatial head (`data.spatial_compare`, models/spatial_head.py, data/grounding.py
`compared_turns`): true targets on training spatial questions only, at the answer position, the
same padded and packed, a loss the trainer sees and that moves the model, generation untouched,
the default batch unchanged, settings refused in one line."""

import random

import pytest
import torch

from graft.build import build_model, processor_for
from graft.data.grounding import Supervised, compared_turns, grounded_turns, spatial_set
from graft.data.packing import pack
from graft.data.streaming import read_record
from graft.data.world_source import WorldSource
from graft.designs import design
from graft.losses import IGNORE
from graft.recipes import recipe
from tests.helpers import assert_refused, with_and_without

SETS = ["data.spatial_compare=true", "train.steps=2"]
OFF = ["data.spatial_compare=false", "train.objectives={lm: 1.0}"]  # shapes_spatial has the head on


def order(d: int) -> int:
    return 0 if d < 0 else 1 if d == 0 else 2


def test_targets_say_how_the_first_named_object_sits_against_the_second():
    cfg = recipe("shapes_spatial", SETS)
    world = WorldSource(cfg, processor_for(cfg)).world
    seen = set()
    for i in range(100):
        sample = world.sample("train", i)
        turns = [(qa.question, qa.answer) for qa in sample.qa]
        out = compared_turns(sample, turns)
        assert [a for _, a in out] == [a for _, a in turns] and [str(q) for q, _ in out] == [q for q, _ in turns]
        for q, _ in out:
            if q not in spatial_set(sample):
                assert getattr(q, "compare", None) is None
                continue
            names = {o.name: o for o in sample.objects}
            first, second = (names[n] for n in sorted((n for n in names if f" {n}" in q), key=lambda n: q.find(f" {n}")))
            assert q.compare == (order(first.col - second.col), order(first.row - second.row))
            seen.add(q.compare)
        grounded = grounded_turns(sample, out, 1.0, random.Random(0))  # grounding keeps the target
        assert [getattr(q, "compare", None) for q, _ in grounded] == [getattr(q, "compare", None) for q, _ in out]
    assert len(seen) >= 6  # left/right/same column with above/below/same row


def test_only_training_conversations_carry_targets_and_off_changes_nothing():
    on, off = recipe("shapes_spatial", SETS), recipe("shapes_spatial", OFF)
    proc_off = processor_for(off)
    train, plain = WorldSource(on, processor_for(on)), WorldSource(off, proc_off)
    marked = sum(getattr(q, "compare", None) is not None for i in range(50) for q, _ in train.example(i).turns)
    assert marked > 50
    assert all(train.example(i).turns == plain.example(i).turns for i in range(50))  # same words, same answers
    val = WorldSource(on, processor_for(on), split="val")
    assert not any(isinstance(q, Supervised) for i in range(50) for q, _ in val.example(i).turns)
    rows = [read_record(proc_off, off.data, plain, i)[0] for i in range(4)]
    assert all(len(r) == 3 for r in rows) and "compare_labels" not in proc_off.collate(rows)


def rows_with_targets(cfg, n=8):
    proc = processor_for(cfg)
    source = WorldSource(cfg, proc)
    return proc, [read_record(proc, cfg.data, source, i)[0] for i in range(n)]


def test_the_target_sits_at_the_token_that_predicts_the_answer_padded_and_packed():
    cfg = recipe("shapes_spatial", SETS)
    proc, rows = rows_with_targets(cfg, 10)
    assert 5 <= sum(len(r) == 4 for r in rows) < 10  # one-object scenes have no spatial question: a mix
    padded = proc.collate(rows)
    at = padded["compare_labels"][..., 0] != IGNORE
    assert (padded["input_ids"][at] == proc.tok.assistant).all()
    answers = padded["labels"][:, 1:][at[:, :-1]]  # the token each target's position predicts
    assert {proc.tok.decode([int(a)]) for a in answers} <= {"yes", "no"}
    assert int(at.sum()) == sum(len(r[3]) for r in rows if len(r) == 4)
    packed = pack(rows, proc.tok.pad, proc.max_seq_len, inputs=proc.inputs)
    pat = packed["compare_labels"][..., 0] != IGNORE
    assert (packed["input_ids"][pat] == proc.tok.assistant).all()
    assert sorted(map(tuple, packed["compare_labels"][pat].tolist())) == sorted(map(tuple, padded["compare_labels"][at].tolist()))


def test_the_loss_is_counted_moves_the_model_and_generation_ignores_the_head():
    cfg = recipe("shapes_spatial", SETS)
    proc, rows = rows_with_targets(cfg)
    batch = proc.collate(rows)
    model, plain = with_and_without(cfg, recipe("shapes_spatial", OFF), proc.tok)
    assert model.spatial_head is not None and plain.spatial_head is None
    assert "compare" in design(cfg.model).config_losses(cfg)
    _, losses = model(**batch, answers_only=True)
    counts = model.loss_counts(**batch)
    assert counts["compare"] == int((batch["compare_labels"][..., 0] != IGNORE).sum()) > 0
    assert 1.5 < losses["compare"].item() / counts["compare"] < 3.5  # two 3-way guesses: about 2 ln 3
    losses["compare"].backward()
    assert model.spatial_head.proj.weight.grad.abs().sum() > 0
    assert model.lm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # it reaches the decoder
    with torch.no_grad():
        ids = batch["input_ids"][:1, :20]
        assert torch.equal(model(ids, batch["pixel_values"][:1])[0], plain(ids, batch["pixel_values"][:1])[0])
    unlabelled = {k: v for k, v in batch.items() if k != "compare_labels"}
    _, none = model(**unlabelled, answers_only=True)
    assert none["compare"].item() == 0 and model.loss_counts(**unlabelled)["compare"] == 0


@pytest.mark.parametrize("name,sets,needle", [
    ("clip", ["data.spatial_compare=true"], "needs data.source=shapes, a VLM model"),
    ("sensors_vlm", ["data.spatial_compare=true"], "needs data.source=shapes"),
    ("shapes_vqa", ["data.spatial_compare=true", "data.images_per_doc=2"], "one image per conversation"),
    ("shapes_vqa", ["data.spatial_compare=true", "data.text_only=true"], "one image per conversation"),
    ("shapes_flamingo", ["data.spatial_compare=true"], "not available with model=flamingo"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, name, sets, needle):
    assert_refused(tmp_path, capsys, [(name, sets, needle)])


def test_a_training_run_logs_the_head_loss_and_learns_differently(tmp_path, capsys):
    """`graft train`: the loss `compare` is logged, and the same seed trains other LM weights with
    the head than without (the setting reaches the trainer)."""
    from safetensors.torch import load_file

    from graft.trainer.metrics import read
    from tests.helpers import cli

    small = ["train.steps=3", "train.batch_size=4", "train.log_every=1", "eval.splits=[]", "train.progress=false"]
    weights = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        code, _, err = cli(capsys, "train", "shapes_spatial", "--out", run,
                           *(a for s in [*small, *(SETS[:1] if flag == "true" else OFF)] for a in ("--set", s)))
        assert code == 0, err
        logged = [r for r in read(run) if "loss" in r]
        assert ("loss/compare" in logged[-1]) == (flag == "true")
        (model,) = (run / "checkpoints").glob("step_*/model/*.safetensors")
        weights[flag] = load_file(model)
    assert any(k.startswith("spatial_head.") for k in weights["true"])
    name = "lm.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights["true"][name], weights["false"][name])


def test_export_leaves_the_head_out_and_imports_back(tmp_path):
    """`graft export --format hf` of a model with the head: LLaVA's logits equal graft's (the head
    never answers), and the folder loads back into a model with a fresh head."""
    from transformers import AutoModelForImageTextToText

    from graft.build import build_processor
    from graft.data.world_source import make_world
    from graft.export import hf_processor
    from graft.models.hf_llava import load_llava_weights, to_llava

    cfg = recipe("tiny", ["data.spatial_compare=true"])
    proc0 = processor_for(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, proc0.tok).eval()
    out = tmp_path / "hf"
    to_llava(model, cfg, proc0.tok).save_pretrained(str(out))
    hf_processor(cfg, proc0.tok, model).save_pretrained(str(out))
    hf = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    proc = build_processor(cfg, proc0.tok, model)
    image = make_world(cfg).sample("test", 0).image
    ids, pixels = torch.tensor([proc.prompt("what color is the circle?")]), proc.pixels(image)[None]
    with torch.no_grad():
        assert (model(ids, pixels)[0] - hf(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-4
    again = build_model(cfg, proc0.tok, pretrained=False)
    load_llava_weights(again, out)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items() if not k.startswith("spatial_head."))


def test_export_refuses_decoder_settings_llava_cannot_express(tmp_path, capsys):
    from tests.helpers import cli

    run = tmp_path / "cells"
    assert cli(capsys, "train", "tiny", "--out", run, "--set", "lm.image_cells=true", "--set", "train.steps=1",
               "--set", "eval.splits=[]", "--set", "train.progress=false")[0] == 0
    code, _, err = cli(capsys, "export", run, "--out", tmp_path / "hf")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lm.image_cells=True" in err
    assert not (tmp_path / "hf").exists()
