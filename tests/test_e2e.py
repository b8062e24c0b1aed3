"""End to end through the CLI: a short run on the built-in world must clearly learn to use the
image, and must leave the run directory the contract describes."""

import json
import subprocess
import sys

from graft.train.metrics import read

STEPS = 480


def test_short_training_run_learns_from_images(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "graft", "train", "shapes_vqa", "--out", str(run),
           "--set", f"train.steps={STEPS}", "--set", "train.batch_size=32", "--set", "train.log_every=20",
           "--set", "train.ckpt_every=240", "--set", "train.progress=false", "--set", "data.max_objects=2",
           "--set", "data.questions_per_image=6", "--set", "eval.vqa_per_type=40", "--set", "eval.captions=20"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)

    results = json.loads((run / "eval.json").read_text())
    assert all(isinstance(v, float) for v in results.values())
    # Colours are uniform over 6 and sizes over 2, so no text-only model can beat 1/6 and 1/2 on
    # these: accuracy far above them means the model reads the image. (Shape, uniform over 4, is
    # learned by step 480 on some CPUs and not on others: 0.31 of 200 on an AVX-512/AMX Xeon.)
    assert results["vqa_acc/color"] >= 0.6, results
    assert results["vqa_acc/size"] >= 0.75, results
    assert results["vqa_acc"] >= 0.6, results
    assert "compositional/vqa_acc" in results and "caption_cider" in results

    records = [r for r in read(run) if r.get("event") != "eval"]
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "data_wait_frac"):
        assert key in records[0], key
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert 0 < records[-1]["mfu"] < 1
    assert [e for e in read(run) if e.get("event") == "eval"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000240", "step_00000480"]
    assert list((run / "checkpoints" / "step_00000480" / "model").glob("*.safetensors"))
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))

    evaluated = subprocess.run([sys.executable, "-m", "graft", "eval", str(run), "--split", "test"],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((run / "eval.json").read_text())
    assert again["vqa_acc"] == results["vqa_acc"]  # same weights, same questions, greedy: same answers
