"""Grounded spatial questions (`data.grounded_spatial`, graft/data/grounding.py): the grounded text
and its spans, training turns only, the default data unchanged, labels on exactly the location
words, never on a plain string, settings refused in one line. More spatial questions per
conversation (`data.spatial_questions`): true ones, training only, the other turns unchanged."""

import random

import pytest

from graft.build import processor_for
from graft.data.grounding import COLUMNS, ROWS, Supervised, ground, grounded_turns, spatial_set
from graft.data.shapes import Obj, _question
from graft.data.world_source import WorldSource, world_tokenizer
from graft.losses import IGNORE
from graft.recipes import recipe
from tests.helpers import assert_refused

RED = Obj("circle", "red", "small", 0, 0)
BLUE = Obj("square", "blue", "large", 2, 1)


def test_each_name_is_followed_by_its_cell_and_the_spans_cover_the_cell_words():
    q = ground("is the red circle left of the blue square?", [BLUE, RED])
    assert q == "is the red circle at top left left of the blue square at bottom center?"
    assert [q[a:b] for a, b in q.spans] == [" top left", " bottom center"]
    assert q.replace(" at top left", "").replace(" at bottom center", "") == "is the red circle left of the blue square?"
    assert (ROWS[RED.row], COLUMNS[RED.col]) == ("top", "left")


def test_only_spatial_training_questions_are_grounded_and_share_zero_changes_nothing():
    base = recipe("shapes_vqa", [])
    plain = WorldSource(base, processor_for(base))
    cfg = recipe("shapes_vqa", ["data.grounded_spatial=0.5"])
    grounded = WorldSource(cfg, processor_for(cfg))
    changed = 0
    for i in range(200):
        before, after = plain.example(i).turns, grounded.example(i).turns
        assert [a for _, a in before] == [a for _, a in after]
        for (q0, _), (q1, _) in zip(before, after):
            if q0 != q1:
                changed += 1
                assert isinstance(q1, Supervised) and q1.startswith("is the ") and " at " in q1
    assert 30 < changed < 200
    val = WorldSource(cfg, processor_for(cfg), split="val")
    assert not any(isinstance(q, Supervised) for i in range(200) for q, _ in val.example(i).turns)
    sample = grounded.world.sample("train", 0)
    turns = [(qa.question, qa.answer) for qa in sample.qa]
    assert grounded_turns(sample, turns, 0.0, random.Random(0)) == turns


def test_labels_are_the_location_words_and_the_answer_and_a_plain_string_gets_none():
    cfg = recipe("shapes_vqa", ["data.grounded_spatial=1.0"])
    proc = processor_for(cfg)
    q = ground("is the red circle left of the blue square?", [RED, BLUE])
    ids, labels = proc.conversation([(q, "yes")])
    targets = [proc.tok.decode([i]) for i, label in zip(ids, labels) if label != IGNORE]
    assert targets == ["top", "left", "bottom", "center", "yes", ""]  # "" = <eos>
    same_text, same_labels = proc.conversation([(str(q), "yes")])  # the same words as data: not targets
    assert same_text == ids
    assert [proc.tok.decode([i]) for i, label in zip(same_text, same_labels) if label != IGNORE] == ["yes", ""]


def test_the_tokenizer_learns_the_location_words_only_when_grounding():
    grounded = world_tokenizer(recipe("shapes_vqa", ["data.grounded_spatial=0.5"]))
    plain = world_tokenizer(recipe("shapes_vqa", []))
    assert all(len(grounded.encode(f" {w}")) == 1 for w in (*ROWS, *COLUMNS))
    assert plain.tok.to_str() == world_tokenizer(recipe("shapes_vqa", [])).tok.to_str()
    assert len(plain.encode(" bottom")) > 1


def _truth(question: str, objects) -> str:
    """The answer to a spatial question, worked out from the objects' cells here."""
    by = {o.name: o for o in objects}
    body = question.removeprefix("is the ").removesuffix("?")
    for rel, test in (("left of", lambda a, b: a.col < b.col), ("right of", lambda a, b: a.col > b.col),
                      ("above", lambda a, b: a.row < b.row), ("below", lambda a, b: a.row > b.row)):
        if f" {rel} the " in body:
            a, b = body.split(f" {rel} the ")
            return "yes" if test(by[a], by[b]) else "no"
    raise AssertionError(question)


def test_more_spatial_questions_are_true_training_only_and_leave_the_other_turns():
    base = recipe("shapes_vqa", [])
    plain = WorldSource(base, processor_for(base))
    cfg = recipe("shapes_vqa", ["data.spatial_questions=2", "data.grounded_spatial=0.5"])
    more = WorldSource(cfg, processor_for(cfg))
    added = grounded = total = 0
    for i in range(200):
        sample = plain.world.sample("train", i)
        before, after = plain.example(i).turns, more.example(i).turns
        spatial = spatial_set(sample)
        kept = [t for t in after if t[0] not in spatial and not isinstance(t[0], Supervised)]
        assert kept == [t for t in before if t[0] not in spatial]  # the other turns, in their order
        has = bool(spatial)
        n_after = sum(q in spatial or isinstance(q, Supervised) for q, _ in after)
        assert n_after == sum(q in spatial for q, _ in before) + (2 if has else 0)
        added, total = added + (2 if has else 0), total + n_after
        for q, a in after:
            if isinstance(q, Supervised):
                grounded += 1
            elif q in spatial:
                assert a == _truth(q, sample.objects)
    assert added > 150 and 0.35 < grounded / total < 0.65
    val = WorldSource(cfg, processor_for(cfg), split="val")
    plain_val = WorldSource(base, processor_for(base), split="val")
    assert all(val.example(i).turns == plain_val.example(i).turns for i in range(50))
    sample = next(s for i in range(20) if len((s := plain.world.sample("train", i)).objects) >= 3 and spatial_set(s))
    assert {_question("spatial", sample.objects, random.Random(k), None).question for k in range(200)} <= spatial_set(sample)


@pytest.mark.parametrize("name,sets,needle", [
    ("shapes_vqa", ["data.grounded_spatial=1.5"], "must be in [0, 1]"),
    ("clip", ["data.grounded_spatial=0.5"], "needs data.source=shapes, a VLM model"),
    ("shapes_vqa", ["data.grounded_spatial=0.5", "data.images_per_doc=2"], "one image per conversation"),
    ("sensors_vlm", ["data.grounded_spatial=0.5"], "needs data.source=shapes"),
    ("shapes_vqa", ["data.spatial_questions=-1"], "data.spatial_questions=-1 must be 0 or more"),
    ("clip", ["data.spatial_questions=2"], "needs data.source=shapes, a VLM model"),
    ("shapes_vqa", ["data.spatial_questions=2", "data.text_only=true"], "one image per conversation"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, name, sets, needle):
    assert_refused(tmp_path, capsys, [(name, sets, needle)])
