"""The Python API (graft/api.py) and the README's Python example, which must run as printed (with
the seconds-long `tiny` recipe in place of `shapes_vqa`)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import graft
from graft.data.shapes import CAPTION_PROMPT, ShapesWorld
from graft.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"


def _scored(path: Path) -> float:
    """VQA accuracy recomputed from a predictions JSONL: exact match after trimming, lower-casing and
    dropping a final full stop (the world's answers are single words or numbers), over all rows."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["question"] != CAPTION_PROMPT]  # captions are scored by CIDEr, not here
    assert len(rows) == 60  # tiny: 10 questions of each of the 6 types
    same = [r["prediction"].strip().lower().rstrip(".").strip() == r["reference"].strip().lower() for r in rows]
    return sum(same) / len(rows)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README block, run as printed in this process (`tiny` for 60 steps at lr 5e-3 in place of
    `shapes_vqa`: long enough that the greedy answers are a mix of right and wrong, 0.45 measured on
    the test split, seed 0, one thread, Intel Xeon), whose printed accuracies must equal a count of
    the prediction files' rows, and eval.json."""
    block = re.search(r"### From Python\n\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block, "README: no ```python block under '### From Python'"
    code = block.group(1)
    assert '"shapes_vqa", {"train.steps": 400' in code
    code = code.replace('"shapes_vqa", {"train.steps": 400',
                        '"tiny", {"train.progress": False, "optim.lr": 5e-3, "train.steps": 60')
    ShapesWorld(24, 3, 4, 0).sample("test", 0).image.save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    lines = capsys.readouterr().out.split("\n")[:-1]  # the last line, the answer, may be empty
    test_acc, compositional = float(lines[-3]), ast.literal_eval(lines[-2])  # results["vqa_acc"], run.evaluate(...)
    saved = json.loads((tmp_path / "runs/py/eval.json").read_text())
    assert test_acc == saved["vqa_acc"]
    # Both scores equal an independent count of right answers in the predictions written beside them.
    assert test_acc == pytest.approx(_scored(tmp_path / "runs/py/eval_shapes_test.jsonl"), abs=1e-12)
    assert compositional["compositional/vqa_acc"] == pytest.approx(  # Run.evaluate rounds to 4 places
        _scored(tmp_path / "runs/py/eval_shapes_compositional.jsonl"), abs=5e-5)
    assert 0 < test_acc < 1  # some right, some wrong: the count above is not trivially 0 or 1


def test_recipe_overrides_are_validated_and_reach_the_config():
    cfg = graft.recipe("tiny", {"train.steps": 7, "eval.splits": ["val"], "optim.lr": 1e-3, "name": "007"})
    assert (cfg.train.steps, cfg.eval.splits, cfg.optim.lr, cfg.name) == (7, ["val"], 1e-3, "007")
    with pytest.raises(UserError, match="train.nope"):
        graft.recipe("tiny", {"train.nope": 1})
    with pytest.raises(UserError, match="unknown recipe"):
        graft.recipe("nope")
    with pytest.raises(AttributeError):
        graft.nothing_here  # noqa: B018


def test_graft_train_stays_callable_after_the_trainer_is_imported(tmp_path):
    """`graft.train(...)` is the API function whichever of graft's modules has been imported (the
    trainer's package is `graft.trainer`, so importing it binds no `graft.train` attribute)."""
    code = ("import graft, graft.trainer.loop, graft.rundir\n"
            f"run = graft.train(graft.recipe('tiny', {{'train.steps': 2, 'eval.splits': []}}), {str(tmp_path / 'r')!r})\n"
            "print(type(run).__name__)")  # the final evaluation (empty: no splits)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "dict", done.stderr[-2000:]
    assert (tmp_path / "r" / "config.yaml").is_file()
