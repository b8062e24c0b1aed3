"""`graft compare`: recipes trained to the same training FLOPs, summarised over seeds; re-runs reuse."""

import json

from graft.cli import main
from graft.config_checks import load

SMALL = [f"--set={part}.{key}={value}" for part in ("vision", "lm")
         for key, value in (("hidden_size", 32), ("layers", 1), ("intermediate_size", 64))]
QUIET = ["--set", "train.progress=false", "--set", "eval.vqa_per_type=4", "--set", "eval.captions=0",
         "--set", "eval.splits=[test]", "--set", "train.batch_size=16", "--set", "train.log_every=1", *SMALL]


def test_two_designs_at_matched_flops_with_seeds_and_reuse(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "shapes_vqa", "shapes_linear", "--budget", "2e9", "--seeds", "2", "--out", str(out), *QUIET]
    assert main(args) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["shapes_vqa", "shapes_linear"]
    for row in rows:
        assert row["steps"] == int(2e9 // row["flops_per_step"]) >= 2  # the same compute, in steps of each design
        assert row["steps"] * row["flops_per_step"] <= 2e9 < (row["steps"] + 1) * row["flops_per_step"]
        assert len(row["runs"]) == 2 and all("vqa_acc" in r["metrics"] for r in row["runs"])
        assert row["image_tokens"] == 9 and row["trainable"] <= row["params"]
    assert rows[0]["flops_per_step"] > rows[1]["flops_per_step"]  # the MLP connector costs more than the linear one
    events = [json.loads(line) for line in (out / "shapes_linear-seed1" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["step"] for e in events if e.get("event") == "eval"]
    assert len(evals) >= 4 and evals[-1] == rows[1]["steps"]  # evaluated along the run, for metric vs FLOPs
    report = (out / "report.md").read_text()
    assert "| shapes_linear |" in report and "±" in report and (out / "loss_vs_flops.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/compare_run.json")}
    assert len(stamps) == 4
    assert main(args) == 0  # the same command again: every run reused, nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/compare_run.json")} == stamps
    capsys.readouterr()
    for extra, needle in ((["shapes_vqa", "--budget", "10"], "smaller than one step of shapes_vqa"),
                          (["shapes_vqa", "--budget", "1e9", "--seeds", "0"], "--seeds=0"),
                          (["nope", "--budget", "1e9"], "unknown recipe 'nope'")):
        capsys.readouterr()
        assert main(["compare", *extra, "--out", str(tmp_path / "bad"), *QUIET]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_arms_that_differ_by_settings_alone(tmp_path, capsys):
    """`--arm NAME=RECIPE KEY=VALUE ...`: the same recipe with other settings is its own row, run
    folder and config; a malformed arm, a repeated name or a bad key is one line, nothing written."""
    out = tmp_path / "cmp"
    args = ["compare", "shapes_vqa", "--arm", "slow=shapes_vqa optim.lr=1e-5 optim.warmup_steps=1",
            "--budget", "1e9", "--seeds", "1", "--out", str(out), *QUIET]
    assert main(args) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["recipe"], r["from"], r["settings"]) for r in rows] == [
        ("shapes_vqa", "shapes_vqa", []), ("slow", "shapes_vqa", ["optim.lr=1e-5", "optim.warmup_steps=1"])]
    assert rows[0]["flops_per_step"] == rows[1]["flops_per_step"] and rows[0]["steps"] == rows[1]["steps"]
    assert load(out / "slow-seed0" / "config.yaml").optim.lr == 1e-5
    assert load(out / "shapes_vqa-seed0" / "config.yaml").optim.lr != 1e-5
    losses = [[json.loads(line).get("loss") for line in (out / f"{name}-seed0" / "metrics.jsonl").read_text().splitlines()]
              for name in ("shapes_vqa", "slow")]
    assert losses[0][-2:] != losses[1][-2:]  # the settings reached the run
    assert "Arm `slow`: `shapes_vqa` with `optim.lr=1e-5` `optim.warmup_steps=1`." in (out / "report.md").read_text()
    for arms, needle in ((["--arm", "slow"], "is not NAME=RECIPE"), (["--arm", "a b=shapes_vqa"], "is not NAME=RECIPE"),
                         (["shapes_vqa", "--arm", "shapes_vqa=shapes_linear"], "two arms share a name"),
                         (["--arm", "x=shapes_vqa optim.nope=1"], "unknown config key 'optim.nope'")):
        capsys.readouterr()
        assert main(["compare", *arms, "--budget", "1e9", "--out", str(tmp_path / "bad"), *QUIET]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad").exists()


def test_a_shared_stage_trains_once_per_seed(tmp_path, capsys):
    """llava_stage2 and llava_stage2_lora both start from llava_stage1: it trains once per seed, in
    stages/, with its own steps (`--set train.steps` reaches it; the budget sets the others')."""
    out = tmp_path / "cmp"
    args = ["compare", "llava_stage2", "llava_stage2_lora", "--budget", "3e9", "--seeds", "2", "--out", str(out),
            "--set", "train.steps=3", *QUIET]
    assert main(args) == 0
    summary = json.loads((out / "compare.json").read_text())
    stage = summary["stages"]["llava_stage1"]
    assert stage["steps"] == 3 and stage["used_by"] == ["llava_stage2", "llava_stage2_lora"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["llava_stage1-seed0", "llava_stage1-seed1"]
    steps = {row["recipe"]: row["steps"] for row in summary["rows"]}
    for recipe in ("llava_stage2", "llava_stage2_lora"):
        for seed in (0, 1):
            cfg = load(out / f"{recipe}-seed{seed}" / "config.yaml")
            assert cfg.train.init_from == str(out / "stages" / f"llava_stage1-seed{seed}")
            assert cfg.train.seed == seed and cfg.train.steps == steps[recipe] > 3
    report = (out / "report.md").read_text()
    assert "llava_stage2, llava_stage2_lora start from `llava_stage1`, trained once per seed for 3 steps" in report
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("stages/*/compare_run.json")}
    assert main(args) == 0 and {p: p.stat().st_mtime_ns for p in out.glob("stages/*/compare_run.json")} == stamps
