"""VQA on a user's own data (issue 12): `graft eval RUN --task vqa --data PATH` on LLaVA JSON and on
a VLMEvalKit multiple-choice TSV gives, question for question, the answers graft generates
directly; bad files are one-line errors or skip counts. (Zero-shot, retrieval and captioning:
tests/test_eval_tasks.py.)"""

import json
import re

import pytest

from graft.build import build_processor, load_run
from graft.cli import main
from graft.data.shapes import COLORS, ShapesWorld
from graft.rundir import RunDir
from tests.data_helpers import encoded
from tests.helpers import EVAL_RUN_SETS as SETS, cli, copy_run
from tests.scoring import greedy


def _vlm(out):
    assert main(["train", "tiny", "--out", str(out / "vlm"), *SETS, "--set", "train.steps=80",
                 "--set", "train.ckpt_every=80"]) == 0


@pytest.fixture
def vlm_run(shared_run, tmp_path):
    """`tiny`, 80 steps, trained once per session; each test evaluates into its own copy."""
    return copy_run(shared_run("eval_tasks_vlm", _vlm) / "vlm", tmp_path / "vlm")


def test_vqa_on_llava_json_matches_a_direct_computation(vlm_run, tmp_path):
    from graft.eval.vqa import questions, vqa_accuracy

    cfg, tok, model, _ = load_run(RunDir(vlm_run))
    world = ShapesWorld(cfg.vision.image_size, cfg.data.grid, cfg.data.max_objects, cfg.data.seed)
    items = questions(world, "test", 8)  # the built-in question set: 8 per type
    records, direct = [], []
    for n, (index, qa) in enumerate(items):
        image = world.sample("test", index).image
        (tmp_path / f"{n:03d}.png").write_bytes(encoded(image))
        records.append({"id": n, "image": f"{n:03d}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{qa.question}"}, {"from": "gpt", "value": qa.answer}]})
        said = greedy(vlm_run, image, qa.question)  # exact match after lower case, outer spaces, a final "."
        direct.append(said.strip().lower().rstrip(".").strip() == qa.answer)
    (tmp_path / "qa.json").write_text(json.dumps(records))
    assert main(["eval", str(vlm_run), "--task", "vqa", "--data", str(tmp_path / "qa.json")]) == 0
    results = json.loads((vlm_run / "eval.json").read_text())
    assert results["vqa_acc"] == round(sum(direct) / len(direct), 4), (results, direct)
    assert 0 < sum(direct) < len(direct)  # a test that some answers are right and some wrong can tell
    reference = vqa_accuracy(model, build_processor(cfg, tok, model), world, "test", 8, 32)[0]
    assert results["vqa_acc"] == round(reference["vqa_acc"], 4)  # and the built-in task agrees
    # the prompt template reaches the model: a different wording gives other answers
    assert main(["eval", str(vlm_run), "--task", "vqa", "--data", str(tmp_path / "qa.json"),
                 "--set", "eval.vqa_prompt=answer this: {question} please"]) == 0
    assert json.loads((vlm_run / "eval.json").read_text())["vqa_acc"] != results["vqa_acc"]


def test_vqa_multiple_choice_from_a_vlmevalkit_tsv(vlm_run, tmp_path, capsys):
    import base64

    from graft.eval.vqa import option_letter

    assert option_letter("B", {"A": "red", "B": "blue"}) == "B"
    assert option_letter("the answer is (A).", {"A": "red", "B": "blue"}) == "A"
    assert option_letter("blue", {"A": "red", "B": "blue"}) == "B" and option_letter("green", {"A": "red"}) is None
    cfg = RunDir(vlm_run).config()
    world = ShapesWorld(cfg.vision.image_size, cfg.data.grid, cfg.data.max_objects, cfg.data.seed)
    rows = ["index\tquestion\tA\tB\tC\tD\tanswer\timage"]
    samples = [s for s in (world.sample("test", i) for i in range(200)) if s.question("color")][:12]
    for i, s in enumerate(samples):
        qa = s.question("color")
        options = [qa.answer] + [c for c in COLORS if c != qa.answer][:3]
        b64 = base64.b64encode(encoded(s.image)).decode()
        rows.append("\t".join([str(i), qa.question, *options, "A", b64]))
    rows.append("\t".join(["99", "what color?", "red", "blue", "", "", "A", "not-base64!!"]))  # skipped, counted
    (tmp_path / "mc.tsv").write_text("\n".join(rows) + "\n")
    assert main(["eval", str(vlm_run), "--task", "vqa", "--data", str(tmp_path / "mc.tsv")]) == 0
    results = json.loads((vlm_run / "eval.json").read_text())
    assert results["vqa_skipped"] == 1
    predictions = [json.loads(l) for l in (vlm_run / "eval_vqa.jsonl").read_text().splitlines()]
    assert len(predictions) == 12
    right = 0
    for s, p in zip(samples, predictions):  # each answer recomputed and judged here
        qa = s.question("color")
        texts = dict(zip("ABCD", [qa.answer] + [c for c in COLORS if c != qa.answer][:3]))
        options = "\n".join(f"{k}. {v}" for k, v in texts.items())
        said = greedy(vlm_run, s.image, cfg.eval.mc_prompt.format(question=qa.question, options=options))
        assert p["prediction"] == said
        # the picked option: the first letter standing alone, else the option the answer spells out
        letters = re.findall(r"\b[ABCD]\b", said)
        picked = letters[0] if letters else next((k for k, v in texts.items() if v == said.strip(" .").lower()), None)
        right += picked == "A"
    assert results["vqa_acc"] == round(right / 12, 4)
    (tmp_path / "bad.tsv").write_text("index\tquestion\tA\tB\timage\n0\tq\tx\ty\t\n")
    for extra, needle in ((["--data", str(tmp_path / "bad.tsv")], "no 'answer' column"),
                          (["--data", str(tmp_path / "mc.tsv"), "--set", "eval.mc_prompt={question}"], "{options}")):
        code, _, err = cli(capsys, "eval", vlm_run, "--task", "vqa", *extra)
        assert code == 2 and needle in err.strip().splitlines()[-1], err
