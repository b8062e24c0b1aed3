"""End to end through the CLI, in real processes (the one test that runs `python -m graft train` and
`graft eval` as a user would; the others call `graft.cli.main` in-process): a short run on the
built-in world must clearly learn to use the image, and must leave the run directory the contract
describes."""

import json
import subprocess
import sys

import pytest

from graft.trainer.metrics import read

STEPS = 150
# shapes_vqa's design at half its width and 2+2 layers (a step costs half as much and it learns
# faster), one object per image.
SMALL = ["vision.hidden_size=64", "vision.intermediate_size=128", "vision.layers=2", "lm.hidden_size=64",
         "lm.intermediate_size=192", "lm.layers=2", "data.max_objects=1"]


@pytest.mark.slow
def test_short_training_run_learns_from_images(tmp_path):
    run = tmp_path / "run"
    sets = [*SMALL, f"train.steps={STEPS}", "train.batch_size=32", "train.log_every=10", "train.ckpt_every=75",
            "train.progress=false", "eval.vqa_per_type=50", "eval.captions=10"]
    cmd = [sys.executable, "-m", "graft", "train", "shapes_vqa", "--out", str(run)]
    done = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((run / "eval.json").read_text())
    assert all(isinstance(v, float) for v in results.values())
    # What the image adds. Text-only ceilings on the test split: colour 1/5 (each shape has one
    # colour held out for the compositional split, so "what color is the circle?" leaves 5), size 1/2.
    # The same run with every image blank (graft's own code, ShapesWorld.render patched to draw the
    # background only; seed 0, one thread) gave colour 0.14, size 0.54, shape 0.36, vqa_acc 0.47 at
    # 150 steps. This run's settings, one thread, Intel Xeon, train.seed 0 / 1: colour 1.00 / 0.98,
    # size 1.00 / 0.86 (at 100 steps seed 1 had only 0.54 / 0.68, hence 150).
    assert results["vqa_acc/color"] >= 0.6, results
    assert results["vqa_acc/size"] >= 0.7, results
    assert "compositional/vqa_acc" in results and "caption_cider" in results and "restyled/vqa_acc" in results

    records = [r for r in read(run) if r.get("event") != "eval"]
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "data_wait_frac"):
        assert key in records[0], key
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert 0 < records[-1]["mfu"] < 1
    assert [e for e in read(run) if e.get("event") == "eval"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000075", "step_00000150"]
    assert list((run / "checkpoints" / "step_00000150" / "model").glob("*.safetensors"))
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))

    evaluated = subprocess.run([sys.executable, "-m", "graft", "eval", str(run), "--split", "test"],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((run / "eval.json").read_text())
    assert again["vqa_acc"] == results["vqa_acc"]  # same weights, same questions, greedy: same answers
