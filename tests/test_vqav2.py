"""VQAv2 soft accuracy (eval/vqav2.py): the official answer normalisation and the min(1, matches/3)
average against hand-computed examples, then `graft eval RUN --task vqa --data DIR` on a VQAv2-layout
data set written from the built-in world, checked against the formula applied to its predictions."""

import json
import shutil

import pytest

from graft.cli import main
from graft.data.shapes import COLORS, ShapesWorld
from graft.eval.vqav2 import normalise_answer, soft_accuracy
from graft.rundir import RunDir


@pytest.mark.parametrize("raw, normal", [
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),  # articles, case
    ("yes.", "yes"), ("Yes!", "yes"), ("(red)", "red"), ("x-ray", "x ray"), ("yes, it is", "yes it is"),
    ("dont", "don't"), ("isnt", "isn't"), ("it's", "it's"), ("couldnt've", "couldn't've"),  # apostrophes
    ("two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),  # number words
    ("1,000", "1000"), ("cat,dog", "cat dog"), ("1,000 (approx)", "1000 approx"),  # digit,digit: marks go
    ("2.5", "2.5"), ("5.", "5"), ("e.g.", "eg"),  # a full stop before a digit stays
    ("  many   words ", "many words"),
])
def test_official_normalisation(raw, normal):
    assert normalise_answer(raw) == normal


def test_soft_accuracy_by_hand():
    def humans(k):  # k of 10 humans said "cat", the others a mix of other answers
        return ["cat"] * k + ["dog", "cow", "hen", "owl", "bee", "ant", "elk", "yak", "emu", "rat"][: 10 - k]

    # k matching: the 10 - k others see k matches, the k matching ones see k - 1 (themselves left out)
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        by_hand = ((10 - k) * min(1, k / 3) + k * min(1, (k - 1) / 3)) / 10
        assert by_hand == pytest.approx(expected)
        assert soft_accuracy("cat", humans(k)) == pytest.approx(expected)
    assert soft_accuracy("  The Cat.\n", humans(2)) == pytest.approx(0.6)  # normalised: the humans differ
    assert soft_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0
    assert soft_accuracy("Dont", ["don't"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # all ten humans agree: nothing is normalised, as in the official code
    assert soft_accuracy("Yes", ["yes"] * 10) == 0.0 and soft_accuracy(" yes\t", ["yes"] * 10) == 1.0
    assert soft_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0  # 8 or 9 others match for every human


# ---- end to end through the CLI ------------------------------------------------------------------

KS = (10, 4, 3, 2, 1, 0)  # humans (of 10) giving the true answer, question by question
KINDS = {"exist": "yes/no", "count": "number", "color": "other"}
WORDS = ["zero", "one", "two", "three", "four", "five"]


def _wrong(answer: str, kind: str) -> str:
    if kind == "exist":
        return "no" if answer == "yes" else "yes"
    if kind == "count":
        return str(int(answer) + 1)
    colors = list(COLORS)
    return colors[(colors.index(answer) + 1) % len(colors)]


def _variant(answer: str, kind: str) -> str:
    """The same answer as another human might type it: equal after the official normalisation."""
    if kind == "exist":
        return answer.capitalize() + "."
    return WORDS[int(answer)] if kind == "count" else "the " + answer.title()


def _posing(world: ShapesWorld, n: int) -> list:
    """n (test sample, question kind) pairs, kinds in turn, each sample able to pose its question
    (a colour question needs a shape that occurs once)."""
    out, index = [], 0
    while len(out) < n:
        sample, kind = world.sample("test", index), list(KINDS)[len(out) % 3]
        out += [(sample, kind)] if sample.question(kind) else []
        index += 1
    return out


@pytest.fixture(scope="module")
def vqav2(tmp_path_factory):
    """A tiny VLM run and a VQAv2 folder: questions, annotations, COCO-named images (jpg and png)."""
    root = tmp_path_factory.mktemp("vqav2")
    run = root / "vlm"
    assert main(["train", "tiny", "--out", str(run), "--set", "train.progress=false", "--set", "eval.splits=",
                 "--set", "train.steps=80", "--set", "train.ckpt_every=80", "--set", "train.batch_size=32",
                 "--set", "train.peak_flops=1e11"]) == 0
    cfg = RunDir(run).config()
    world = ShapesWorld(cfg.vision.image_size, cfg.data.grid, cfg.data.max_objects, cfg.data.seed)
    data = root / "data"
    data.mkdir()
    questions, annotations, truth = [], [], {}
    for n, (sample, kind) in enumerate(_posing(world, 18)):
        qa, k, image_id = sample.question(kind), KS[n // 3], 1000 + n  # every kind meets every k
        canonical = [qa.answer] * k + [_wrong(qa.answer, kind)] * (10 - k)
        raw = [_variant(qa.answer, kind)] + canonical[1:] if 0 < k < 10 else canonical
        name = f"{image_id}.png" if n % 5 == 4 else f"COCO_val2014_{image_id:012d}.jpg"
        sample.image.save(data / name)
        questions.append({"image_id": image_id, "question": qa.question, "question_id": 10 * image_id})
        annotations.append({"question_id": 10 * image_id, "image_id": image_id, "answer_type": KINDS[kind],
                            "multiple_choice_answer": qa.answer, "question_type": "what",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(raw)]})
        truth[str(10 * image_id)] = (canonical, KINDS[kind])
    questions.append({"image_id": 5, "question": "is there an image?", "question_id": 50})  # no image file: skipped
    questions.append({"image_id": 6, "question_id": 60})  # no question text: skipped
    annotations += [{"question_id": 50, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
                    {"question_id": 60, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10}]
    (data / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": questions}))
    (data / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return run, data, truth


def _by_formula(prediction: str, canonical: list[str]) -> float:
    """The official accuracy, applied here: humans that differ are compared after normalisation."""
    p = normalise_answer(prediction) if len(set(canonical)) > 1 else prediction.strip()
    return sum(min(1, sum(c == p for j, c in enumerate(canonical) if j != i) / 3) for i in range(10)) / 10


def test_vqav2_soft_accuracy_through_the_cli(vqav2):
    run, data, truth = vqav2
    assert main(["eval", str(run), "--task", "vqa", "--data", str(data)]) == 0
    results = json.loads((run / "eval.json").read_text())
    predictions = [json.loads(line) for line in (run / "eval_vqa.jsonl").read_text().splitlines()]
    assert len(predictions) == 18 and results["vqa_skipped"] == 2  # the missing image, the missing question
    per_kind = {}
    for p in predictions:
        canonical, kind = truth[p["id"]]
        score = _by_formula(p["prediction"], canonical)
        assert p["score"] == pytest.approx(score) and p["correct"] == (score > 0) and len(p["reference"]) == 10
        per_kind.setdefault(kind, []).append(score)
    everything = [s for scores in per_kind.values() for s in scores]
    assert results["vqa_acc"] == pytest.approx(sum(everything) / 18, abs=1e-4)
    for kind in ("yes/no", "number", "other"):
        assert results[f"vqa_acc/{kind}"] == pytest.approx(sum(per_kind[kind]) / 6, abs=1e-4)
    assert 0 < results["vqa_acc"] < 1  # some answers match, and not all humans agree with them


def test_vqav2_from_the_questions_file_with_named_annotations(vqav2, tmp_path, capsys):
    run, data, _ = vqav2
    assert main(["eval", str(run), "--task", "vqa", "--data", str(data)]) == 0
    from_folder = json.loads((run / "eval.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(data, other)
    answers = tmp_path / "answers.json"
    (other / "v2_mscoco_val2014_annotations.json").rename(answers)
    (other / "a_annotations.json").write_text("{}")
    (other / "b_annotations.json").write_text("{}")
    args = ["eval", str(run), "--task", "vqa", "--data", str(other / "v2_OpenEnded_mscoco_val2014_questions.json")]
    assert main(args) == 2  # two candidates beside the questions: one line naming the folder
    assert "expected one *annotations*.json there (VQAv2 layout), found a_annotations.json, b_annotations.json" in \
        capsys.readouterr().err
    assert main([*args, "--set", f"eval.vqa_annotations={answers}"]) == 0  # the key wins over discovery
    assert json.loads((run / "eval.json").read_text()) == from_folder


def test_vqav2_bad_input_is_one_line_naming_the_file(vqav2, tmp_path, capsys):
    run, data, _ = vqav2
    doc = json.loads((data / "v2_mscoco_val2014_annotations.json").read_text())
    (tmp_path / "q_questions.json").write_text((data / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    (tmp_path / "q_annotations.json").write_text(json.dumps({"annotations": doc["annotations"][1:]}))
    cases = [
        (tmp_path, f"q_annotations.json: no annotation for question_id {10 * 1000}"),
        (tmp_path / "missing", "not found"),
        (data / "v2_mscoco_val2014_annotations.json", "expected an object with a `questions` list"),
    ]
    for where, needle in cases:
        assert main(["eval", str(run), "--task", "vqa", "--data", str(where)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    (tmp_path / "q_annotations.json").write_text(json.dumps([]))
    assert main(["eval", str(run), "--task", "vqa", "--data", str(tmp_path)]) == 2
    assert "q_annotations.json: expected an object with an `annotations` list" in capsys.readouterr().err
