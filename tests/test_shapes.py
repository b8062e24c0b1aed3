"""The built-in world: determinism, splits, the held-out compositional pairs, question coverage."""

import numpy as np

from graft.data.shapes import CLASSES, COLORS, HELD_OUT, QUESTION_TYPES, SHAPES, ShapesWorld


def pixels(sample):
    return np.asarray(sample.image)


def test_sample_is_a_pure_function_of_seed_split_index():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 1, 999):
        sa, sb = a.sample("train", i), b.sample("train", i)
        assert sa.caption == sb.caption and sa.qa == sb.qa and sa.label == sb.label
        assert np.array_equal(pixels(sa), pixels(sb))
    # order of access does not matter
    assert a.sample("test", 7).caption == ShapesWorld(seed=3).sample("test", 7).caption


def test_seeds_and_splits_differ():
    w, other = ShapesWorld(seed=0), ShapesWorld(seed=1)
    train = [w.sample("train", i).caption for i in range(50)]
    assert train != [w.sample("test", i).caption for i in range(50)]
    assert train != [other.sample("train", i).caption for i in range(50)]


def test_held_out_pairs_only_in_compositional_split():
    w = ShapesWorld()
    for split in ("train", "val", "test"):
        for i in range(300):
            assert not {(o.color, o.shape) for o in w.sample(split, i).objects} & HELD_OUT
    for i in range(100):
        s = w.sample("compositional", i)
        assert (s.objects[0].color, s.objects[0].shape) in HELD_OUT


def test_scene_contents_and_questions():
    w = ShapesWorld(image_size=48, grid=3, max_objects=3)
    kinds, counts = set(), set()
    for i in range(300):
        s = w.sample("train", i)
        assert s.image.size == (48, 48) and s.image.mode == "RGB"
        assert 1 <= len(s.objects) <= 3
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)  # one object per cell
        assert CLASSES[s.label] == s.objects[0].name
        for o in s.objects:
            assert f"a {o.size} {o.color} {o.shape}" in s.caption
        for qa in s.qa:
            kinds.add(qa.kind)
            if qa.kind == "count":
                counts.add(qa.answer)
            if qa.kind == "color":
                assert qa.answer in COLORS
            if qa.kind == "shape":
                assert qa.answer in SHAPES
            if qa.kind in ("exist", "spatial"):
                assert qa.answer in ("yes", "no")
    assert kinds == set(QUESTION_TYPES)
    assert {"0", "1", "2", "3"} <= counts


def test_count_and_spatial_answers_match_the_scene():
    w = ShapesWorld()
    checked = 0
    for s in (w.sample("train", i) for i in range(200)):
        for qa in s.qa:
            if qa.question == "how many objects are there?":
                assert qa.answer == str(len(s.objects))
            if qa.kind != "spatial":
                continue
            words = qa.question[len("is the "):-1]
            rel = next(r for r in ("left of", "right of", "above", "below") if f" {r} the " in words)
            a_name, b_name = words.split(f" {rel} the ")
            a = next(o for o in s.objects if o.name == a_name)
            b = next(o for o in s.objects if o.name == b_name)
            truth = {"left of": a.col < b.col, "right of": a.col > b.col,
                     "above": a.row < b.row, "below": a.row > b.row}[rel]
            assert qa.answer == ("yes" if truth else "no")
            checked += 1
    assert checked > 20


def test_yes_no_answers_are_balanced():
    w = ShapesWorld()
    answers = [qa.answer for i in range(2000) for qa in w.sample("train", i).qa if qa.kind in ("exist", "spatial")]
    yes = answers.count("yes") / len(answers)
    assert 0.4 < yes < 0.6
