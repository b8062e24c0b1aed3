"""The built-in world's interleaved documents (data.images_per_doc) and the in-context evaluation
(`fewshot`, `documents` tasks): what a document asks is true of its images, the trainer's rows hold
every kept image, prompts with earlier turns are the conversation's own prefix, and few-shot
examples are fixed per query."""

import json
from types import SimpleNamespace

import pytest
import torch

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.build import build_stream
from graft.data.check import processor_for
from graft.data.documents import document
from graft.data.processor import collate
from graft.data.samples import image_runs
from graft.data.shapes import ShapesWorld
from graft.eval.fewshot import fewshot_vlm, prompt, shots
from graft.eval.vqa import vqa_accuracy
from graft.eval.world import WorldSplit
from graft.losses import IGNORE
from graft.recipes import tiny
from tests.helpers import tiny_vlm

WORLD = ShapesWorld(image_size=32, grid=3, max_objects=3)


def test_document_questions_are_true_of_their_images():
    seen = set()
    for i in range(200):
        doc = document(WORLD, "train", i, 3, 1, 0.25)
        assert doc == document(WORLD, "train", i, 3, 1, 0.25)  # a pure function of the index
        assert [s.caption for s in doc.samples] == [WORLD.sample("train", 3 * i + k).caption for k in range(3)]
        assert [turn for turn, _ in doc.places] == [t for t, (q, _) in enumerate(doc.turns) if q.startswith("image ")]
        for (question, answer), kind in zip(doc.turns, doc.kinds):
            seen.add(kind)
            if kind == "which":  # the object is in that image and in no other
                name = question.removeprefix("which image shows a ").rstrip("?")
                has = [any(f"{o.size} {o.name}" == name for o in s.objects) for s in doc.samples]
                assert has.count(True) == 1 and answer == f"image {has.index(True) + 1}"
            if kind == "recall":  # about an image before the last, a question not already asked of it
                k = int(question.split(",")[0].removeprefix("in image ")) - 1
                asked = question.split(", ", 1)[1]
                assert k < 2 and (asked, answer) in [(qa.question, qa.answer) for qa in doc.samples[k].qa]
                own = doc.turns[doc.places[k][0]: doc.places[k + 1][0]]  # the turns about image k
                assert all(not q.endswith(asked) for q, _ in own)
    assert {"which", "recall", "caption", "color"} <= seen


def test_document_rows_hold_every_kept_image():
    cfg = apply_overrides(tiny(), ["data.images_per_doc=3", "data.questions_per_image=1", "data.pack=false"])
    proc = processor_for(cfg)
    stream = build_stream(cfg, proc, SimpleNamespace(rank=0, world_size=1, device="cpu")).stream
    ids, labels, pixels = stream.row(5)
    assert image_runs(ids, proc.tok.image, proc.num_image_tokens) == [proc.num_image_tokens] * 3 and len(pixels) == 3
    doc = document(stream.source.world, "train", 5, 3, 1, cfg.data.caption_prob)
    supervised = proc.tok.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert supervised == "".join(answer for _, answer in doc.turns)
    # a short max_seq_len drops the last turns whole, with their images
    proc.max_seq_len = len(ids) - 20
    ids, _, pixels = stream.row(5)
    assert len(image_runs(ids, proc.tok.image, proc.num_image_tokens)) == len(pixels) and len(ids) <= proc.max_seq_len


@pytest.mark.parametrize("sets, message", [
    (["data.images_per_doc=0"], "data.images_per_doc=0 must be >= 1"),
    (["model=dual", "data.images_per_doc=2"], "reads one image per example"),
    (["data.source=llava", "data.path=x.json", "data.images_per_doc=2"], "each record holds its own images"),
    (["eval.doc_images=1"], "doc_images >= 2"),
    (["eval.shots=[0,-1]"], "must be >= 0"),
])
def test_document_settings_are_checked(sets, message, capsys):
    assert main(["train", "tiny", "--dry-run", *[a for s in sets for a in ("--set", s)]]) == 2
    assert message in capsys.readouterr().err


def test_prompt_with_context_is_the_conversation_prefix():
    _, proc = tiny_vlm()
    proc.max_seq_len = 1024  # no turn dropped
    doc = document(WORLD, "test", 3, 3, 2, 0.0)
    ids, _ = proc.conversation(doc.turns, doc.places)
    t = len(doc.turns) - 1
    head = proc.prompt(doc.turns[t][0], 0, (doc.turns[:t], doc.places))
    assert ids[: len(head)] == head and ids[len(head):] == proc.tok.encode(doc.turns[t][1]) + [proc.tok.eos]


def test_fewshot_examples_are_fixed_per_query_and_zero_shot_is_the_world_score():
    eight = shots(WORLD, "test", 7, 8, "color")
    assert [q for _, q, _ in shots(WORLD, "test", 7, 4, "color")] == [q for _, q, _ in eight[:4]]
    assert all(q.startswith("what color") for _, q, _ in eight)
    assert shots(WORLD, "test", 8, 4, "color") != eight[:4]
    images, _, (turns, places) = prompt(eight[:2], WORLD.sample("test", 7).image, "what color is the circle?")
    assert len(images) == 3 and places == [(0, 0), (1, 0)] and turns == [(q, a) for _, q, a in eight[:2]]
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    model.eval()
    cfg = tiny()
    cfg.eval.vqa_per_type, cfg.eval.captions, cfg.eval.shots = 2, 2, [0, 2]
    metrics, predictions = fewshot_vlm(model, proc, WorldSplit("test", WORLD), cfg)
    zero, _ = vqa_accuracy(model, proc, WORLD, "test", 2, 8)
    assert metrics["fewshot_vqa@0"] == zero["vqa_acc"] and set(metrics) == {
        "fewshot_vqa@0", "fewshot_cider@0", "fewshot_vqa@2", "fewshot_cider@2"}
    # the k-shot prompt holds the examples: changing an example's image changes what the model reads
    query = WORLD.sample("test", 0).image
    two = prompt(eight[:2], query, "what color is the circle?")
    other = prompt([(WORLD.sample("test", 99).image, *eight[0][1:]), eight[1]], query, "what color is the circle?")
    logits = [model(torch.tensor([proc.prompt(p[1], 1, p[2])]), torch.stack([proc.pixels(i) for i in p[0]]))[0]
              for p in (two, other)]
    assert not torch.allclose(logits[0][0, -1], logits[1][0, -1])
    assert {p["id"] for p in predictions} >= {"test/0@2", "test/caption/1@2"}


@pytest.mark.parametrize("model", ["vlm", "flamingo"])
def test_fewshot_and_documents_through_the_cli(tmp_path, model):
    sets = [f"model={model}", "data.images_per_doc=3", "data.questions_per_image=1", "train.steps=4", "eval.splits=[]",
            "eval.tasks=[fewshot=test,documents=val]", "eval.vqa_per_type=2", "eval.captions=2", "eval.documents=4",
            "eval.shots=[0,1]"]
    assert main(["train", "tiny", "--out", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)]]) == 0
    metrics = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert {"test/fewshot_vqa@0", "test/fewshot_vqa@1", "test/fewshot_cider@1", "val/doc_acc"} <= set(metrics)
    lines = (tmp_path / "r" / "eval_val_documents.jsonl").read_text().splitlines()
    assert len(lines) >= 4 and all(json.loads(line)["question"].startswith(("which", "in image")) for line in lines)


def test_text_only_world_and_the_text_task(tmp_path):
    """data.text_only: the scene in words, no image, trains; the `text` task's loss is the model's own
    mean answer-token loss on those conversations (checked against the trainer's loss function)."""
    from graft.data.check import processor_for
    from graft.data.world_source import in_words
    from graft.eval.text_world import text_vlm
    from graft.losses import batch_loss

    cfg = apply_overrides(tiny(), ["data.text_only=true", "data.pack=false"])
    proc = processor_for(cfg)
    stream = build_stream(cfg, proc, SimpleNamespace(rank=0, world_size=1, device="cpu")).stream
    ids, _, pixels = stream.row(2)
    sample = stream.source.world.sample("train", 2)
    assert pixels == [] and proc.tok.image not in ids
    assert proc.tok.decode(ids).count(sample.caption) == 1
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    model.eval()
    cfg.eval.vqa_per_type = 2
    metrics, predictions = text_vlm(model, proc, WorldSplit("val", WORLD), cfg)
    assert set(metrics) == {"text_loss", "text_acc"} and len(predictions) == 12
    turns = [(p["question"], p["reference"]) for p in predictions]
    rows = [(*proc.conversation([t], []), []) for t in turns]
    with torch.no_grad():
        whole = batch_loss(model, collate(rows, proc.tok.pad, proc.image_size))
    assert abs(metrics["text_loss"] - float(whole)) < 1e-4
    assert all(p["question"].startswith("the scene: ") and "." in p["question"] for p in predictions)
    assert in_words(sample, [("q?", "a")]) == [(f"the scene: {sample.caption}. q?", "a")]


def test_a_text_only_run_trains_and_is_scored_on_text(tmp_path):
    sets = ["data.text_only=true", "train.steps=4", "eval.splits=[]", "eval.tasks=[text=test]", "eval.vqa_per_type=2"]
    assert main(["data", "check", "tiny", *[a for s in sets[:1] for a in ("--set", s)]]) == 0
    assert main(["train", "tiny", "--out", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)]]) == 0
    metrics = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert set(metrics) == {"text_loss", "text_acc"} and metrics["text_loss"] > 0  # the only task: unprefixed


def test_the_documents_task_asks_both_kinds_whatever_the_training_config():
    from graft.eval.fewshot import documents_vlm

    torch.manual_seed(0)
    model, proc = tiny_vlm()
    cfg = apply_overrides(tiny(), ["data.questions_per_image=6", "eval.documents=6"])
    metrics, predictions = documents_vlm(model.eval(), proc, WorldSplit("test", WORLD), cfg)
    assert {"doc_acc/which", "doc_acc/recall"} <= set(metrics)
    assert sum(p["question"].startswith("in image") for p in predictions) >= 3
