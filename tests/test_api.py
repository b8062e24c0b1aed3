"""The Python API (graft/api.py) and the README's Python example, which must run as printed (with
the seconds-long `tiny` recipe in place of `shapes_vqa`)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import graft
from graft.data.shapes import ShapesWorld
from graft.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_python_example_runs(tmp_path):
    block = re.search(r"### From Python\n\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block, "README: no ```python block under '### From Python'"
    code = block.group(1)
    assert '"shapes_vqa", {"train.steps": 400' in code
    code = code.replace('"shapes_vqa", {"train.steps": 400', '"tiny", {"train.progress": False, "train.steps": 20')
    ShapesWorld(24, 3, 4, 0).sample("test", 0).image.save(tmp_path / "scene.png")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")[:-1]  # the last line, the answer, may be empty
    assert 0 <= float(lines[-3]) <= 1  # results["vqa_acc"]
    assert "'compositional/vqa_acc'" in lines[-2]  # run.evaluate("shapes", "compositional")
    saved = json.loads((tmp_path / "runs/py/eval.json").read_text())
    assert float(lines[-3]) == saved["vqa_acc"] and (tmp_path / "runs/py/eval_shapes_compositional.jsonl").is_file()


def test_recipe_overrides_are_validated_and_reach_the_config():
    cfg = graft.recipe("tiny", {"train.steps": 7, "eval.splits": ["val"], "optim.lr": 1e-3, "name": "007"})
    assert (cfg.train.steps, cfg.eval.splits, cfg.optim.lr, cfg.name) == (7, ["val"], 1e-3, "007")
    with pytest.raises(UserError, match="train.nope"):
        graft.recipe("tiny", {"train.nope": 1})
    with pytest.raises(UserError, match="unknown recipe"):
        graft.recipe("nope")
    with pytest.raises(AttributeError):
        graft.nothing_here  # noqa: B018


def test_graft_train_stays_callable_after_its_package_is_imported(tmp_path):
    """`import graft.train.loop` (or any module that imports it) makes `graft.train` the package;
    the API function must still be what `graft.train(...)` calls."""
    code = ("import graft, graft.train.loop, graft.rundir\n"
            f"run = graft.train(graft.recipe('tiny', {{'train.steps': 2, 'eval.splits': []}}), {str(tmp_path / 'r')!r})\n"
            "print(type(run).__name__)")  # the final evaluation (empty: no splits)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "dict", done.stderr[-2000:]
    assert (tmp_path / "r" / "config.yaml").is_file()
