"""`graft scale sweep` (graft/sweep.py, ladder.py, isoflop.py, sweep_report.py, trainer/heldout.py):
the size ladder's shapes and counts, approach 2 against a known law, the held-out loss against a
direct computation, a real sweep with two jobs that trains each size to its budget and reuses its
runs, the cluster launch files, and bad requests refused in one line."""

import csv
import json
import math
import os
import shlex

import numpy as np
import pytest
import torch
import yaml

from graft import isoflop
from graft.build import assemble, build_processor, load_run, resolve, tokenizer_for
from graft.data.sources import build_sources
from graft.data.stream import IndexedStream
from graft.designs import uses_packing
from graft.ladder import ladder
from graft.losses import batch_loss
from graft.recipes import recipe
from graft.rundir import RunDir
from graft.scaling import NAMES, Fit
from graft.sweep import plan
from tests.helpers import cli, one_line_error


@pytest.mark.parametrize("name", ["shapes_vqa", "shapes_fuyu", "shapes_scale"])
def test_every_size_is_a_valid_shape_with_its_parameters_counted(name):
    """Each size keeps the recipe's head width and KV grouping and passes the config's checks; N on
    the meta device equals the parameters of the model really built; a target count picks the
    width whose model comes closest (its neighbours are further away)."""
    cfg = recipe(name, [])
    unit = (cfg.lm.hidden_size // cfg.lm.heads) * (cfg.lm.heads // cfg.lm.kv_heads)
    sizes = ladder(cfg, [f"{unit}x1", f"{2 * unit}x2", "300k"])
    assert [s.params for s in sizes] == sorted(s.params for s in sizes)
    for size in sizes:
        sized = recipe(name, list(size.sets))  # validated
        assert sized.lm.hidden_size // sized.lm.heads == cfg.lm.hidden_size // cfg.lm.heads
        assert sized.lm.heads // sized.lm.kv_heads == cfg.lm.heads // cfg.lm.kv_heads
        if "vision.hidden_size=" in " ".join(size.sets):
            assert sized.vision.hidden_size // sized.vision.heads == cfg.vision.hidden_size // cfg.vision.heads
    small = recipe(name, list(sizes[0].sets))
    tok = tokenizer_for(small)
    model = assemble(resolve(small, tok)[0], tok)
    assert sizes[0].params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert 0 < sizes[0].non_embedding < sizes[0].params
    target = ladder(cfg, ["300k"])[0]
    near = [ladder(cfg, [f"{w}x{depth}"])[0] for w, depth in _neighbours(cfg, target, unit)]
    assert near and all(abs(math.log(target.params / 3e5)) <= abs(math.log(n.params / 3e5)) for n in near)


def _neighbours(cfg, size, unit):
    """The ladder's widths beside `size`'s, at the depth the ladder gives them."""
    width = int(size.name[1:].split("L")[0])
    out = []
    for w in (width - unit, width + unit):
        if w > 0:
            out.append((w, max(1, round(w * cfg.lm.layers / cfg.lm.hidden_size))))
    return out


def test_approach_2_finds_the_optimum_of_a_known_law():
    """IsoFLOP profiles of L = E + A/N^alpha + B/D^beta with D = C / 6N: each parabola's minimum
    lands near the law's own N_opt(C), and N_opt ∝ C^a with a = beta / (alpha + beta)."""
    law = Fit(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.28, objective=0.0, points=0)
    budgets = [1e18, 1e19, 1e20, 1e21]
    flops, params, tokens, loss = [], [], [], []
    for c in budgets:
        n_opt, _ = law.frontier(c)
        for n in n_opt * np.logspace(-0.5, 0.5, 7):
            flops.append(c), params.append(n), tokens.append(c / (6 * n)), loss.append(law.loss(n, c / (6 * n)))
    found = isoflop.profiles(flops, params, tokens, loss)
    assert len(found) == 4 and all(p.bracketed for p in found)
    for p in found:  # a parabola in log N through a smooth valley: its minimum within 5 % of the law's
        assert p.n_opt == pytest.approx(float(law.frontier(p.flops)[0]), rel=0.05)
        assert p.d_opt == pytest.approx(float(law.frontier(p.flops)[1]), rel=0.05)
    fit = isoflop.exponents(found)
    assert fit["a"] == pytest.approx(0.28 / 0.62, abs=0.01) and fit["b"] == pytest.approx(0.34 / 0.62, abs=0.01)


def test_a_profile_without_a_bracketed_minimum_is_left_out():
    """Losses still falling at the largest size trained: the minimum is an extrapolation, flagged,
    and the exponents refuse to draw a line through fewer than two bracketed minima."""
    n = np.array([1e5, 2e5, 4e5, 8e5])
    falling = isoflop.profile(1e15, n, 1e15 / (6 * n), 3.0 - 0.1 * np.log(n) + 0.001 * np.log(n) ** 2)
    assert not falling.bracketed
    cap = isoflop.profile(1e15, n, 1e15 / (6 * n), -(np.log(n) - 12.5) ** 2)  # opens downwards
    assert not cap.has_minimum and not cap.bracketed
    assert isoflop.exponents([falling, cap]) is None


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "run"
    code = _main("train", "tiny", "--out", out, "--set", "eval.splits=[]", "--set", "eval.heldout_batches=2",
                 "--set", "train.progress=false")
    assert code == 0
    return out


def _main(*args) -> int:
    from graft.cli import main
    return main([str(a) for a in args])


def test_the_heldout_loss_is_the_training_objective_on_the_val_split(heldout_run):
    """eval.heldout_batches=2: the figure in eval.json equals the model's own mean loss over the
    val split's first two steps of rows (each batch's mean weighted by its count), and is not the
    training split's figure at the same record numbers."""
    cfg, tok, model, _ = load_run(RunDir(heldout_run))
    proc = build_processor(cfg, tok, model)

    def loss_on(split):
        (source,) = build_sources(cfg, proc, split)[0]
        stream = IndexedStream(source, proc, cfg, packs=uses_packing(cfg))
        total = count = 0.0
        with torch.no_grad():
            for step in range(2):
                batch = stream.batch(step, 0)
                n = sum(model.loss_counts(**batch).values())
                total, count = total + batch_loss(model, batch).item() * n, count + n
        return total / count

    reported = json.loads((heldout_run / "eval.json").read_text())["heldout_loss"]
    assert reported == pytest.approx(loss_on("val"), abs=2e-5)  # rounded to 5 decimals in eval.json
    assert abs(reported - loss_on("train")) > 1e-3


def test_a_heldout_loss_needs_a_split_no_run_reads(capsys, tmp_path):
    shards = tmp_path / "x.tar"
    shards.write_bytes(b"")
    one_line_error(cli(capsys, "train", "tiny", "--dry-run", "--set", "data.source=webdataset", "--set",
                       f"data.shards=[{shards}]", "--set", "eval.splits=[]", "--set", "eval.heldout_batches=2"),
                   "eval.heldout_batches=2")


@pytest.mark.slow  # trains three runs in processes of their own
def test_a_sweep_trains_each_size_to_its_budget_on_its_own_core_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ("scale", "sweep", "tiny", "--budgets", "5e9", "--sizes", "16x1", "32x1", "48x1", "--out", out,
            "--jobs", min(2, len(os.sched_getaffinity(0))), "--bootstrap", "20")
    code, printed, err = cli(capsys, *args)
    assert code == 0, err
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert [r["size"] for r in rows] == ["d16L1", "d32L1", "d48L1"]
    for r in rows:
        run = out / "runs" / r["run"]
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        steps, flops = int(r["steps"]), float(r["flops"])
        assert cfg["lm"]["hidden_size"] == int(r["size"][1:3]) and cfg["train"]["steps"] == steps
        assert flops <= 5e9 < flops / steps * (steps + 1)  # trained to the budget: one more step passes it
        assert float(r["loss"]) == json.loads((run / "eval.json").read_text())["heldout_loss"]
        trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(x["step"] for x in trained if "loss" in x) == steps
    firsts = {(out / "logs" / f"{r['run']}.log").read_text().splitlines()[0] for r in rows}
    if len(os.sched_getaffinity(0)) >= 2:  # two jobs at once, each pinned to one core with one thread
        assert {line.split("cores ")[1] for line in firsts} == {"0, OMP_NUM_THREADS=1", "1, OMP_NUM_THREADS=1"}
    report = (out / "report.md").read_text()
    assert "| 5e+09 |" in report and "approach 3 needs at least 10" in report
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/eval.json")}
    code, printed, _ = cli(capsys, *args)
    assert code == 0 and printed.count("(done)") == 3
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/eval.json")}


@pytest.mark.parametrize("kind", ["slurm", "torchrun"])
def test_a_sweep_can_be_written_out_for_a_cluster(tmp_path, capsys, kind):
    """--launch writes one `graft train` per run (each a valid command: it dry-runs) and the script
    that runs them; nothing is trained here."""
    out = tmp_path / "sweep"
    code, printed, err = cli(capsys, "scale", "sweep", "tiny", "--budgets", "4e9", "8e9", "--sizes", "16x1", "32x1",
                             "--out", out, "--launch", kind)
    assert code == 0, err
    lines = (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 4 and not (out / "runs").exists()
    words = shlex.split(lines[0])
    start = words.index("graft") + 1
    assert words[start:start + 2] == ["train", "tiny"]
    assert cli(capsys, *words[start:], "--dry-run")[0] == 0
    if kind == "slurm":
        assert "#SBATCH --array=0-3" in (out / "sweep.sbatch").read_text()
    else:
        assert lines[0].startswith("torchrun --standalone --nproc_per_node=${NPROC:-1} -m graft train tiny")


@pytest.mark.parametrize("args, needle", [
    (("tiny", "--budgets", "4e9", "--sizes", "16x1", "--set", "lm.hidden_size=64"), "lm.hidden_size"),
    (("tiny", "--budgets", "1e3", "--sizes", "16x1"), "no run is long enough"),
    (("tiny", "--budgets", "4e9"), "give --budgets and --sizes"),
    (("tiny", "--budgets", "4e9", "--sizes", "24x1"), "multiple of 16"),
    (("tiny", "--budgets", "4e9", "--sizes", "lots"), "--sizes lots"),
    (("tiny", "--budgets", "4e9", "--sizes", "16x1", "16x1"), "both give d16L1"),
    (("clip", "--budgets", "4e9", "--sizes", "16x1"), "has no LM to scale"),
    (("sensors_vlm", "--budgets", "4e9", "--sizes", "16x1"), "series"),
    (("tiny", "--budgets", "4e9", "--sizes", "16x1", "--jobs", "0"), "--jobs=0"),
    (("tiny", "--budgets", "4e9", "--sizes", "16x1", "--jobs", "999"), "--jobs=999: this process may run on"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, capsys, args, needle):
    one_line_error(cli(capsys, "scale", "sweep", *args, "--out", tmp_path / "s", "--plan"), needle)
    assert not (tmp_path / "s").exists()


def test_a_sweeps_prediction_is_the_fits_optimum_on_measured_compute_with_a_ready_command(tmp_path, capsys):
    """A sweep folder whose fit is a known law: `graft scale predict DIR --flops C` names the N that
    minimises the law along C's isoFLOP line (searched here by brute force over the measured FLOPs
    per token), the ladder size nearest it, that size's steps to C, and the law's loss there."""
    law = Fit(E=0.3, A=30.0, B=300.0, alpha=0.45, beta=0.5, objective=0.0, points=0)
    sized = plan("tiny", [1e12], ["16x1", "32x1", "48x1", "64x1"], 1, [])
    per_token = {r.size.params: r.flops_per_step / r.tokens_per_step for r in sized.runs}
    (tmp_path / "fit").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({
        "recipe": "tiny", "overrides": [], "flops_per_token": {str(k): v for k, v in per_token.items()},
        "approach2": {"exponents": None}}))
    constants = [law.E, law.A, law.B, law.alpha, law.beta]
    (tmp_path / "fit" / "fit.json").write_text(json.dumps({"fit": dict(zip(NAMES, constants)),
                                                            "bootstrap": [constants] * 3}))
    c = 2e11
    n = np.geomspace(min(per_token) / 2, max(per_token) * 2, 4000)
    fpt = np.exp(np.interp(np.log(n), np.log(sorted(per_token)), np.log([per_token[k] for k in sorted(per_token)])))
    inside = (n >= min(per_token)) & (n <= max(per_token))
    best = n[inside][np.argmin(law.loss(n, c / fpt)[inside])]
    code, printed, err = cli(capsys, "scale", "predict", tmp_path, "--flops", c)
    assert code == 0, err
    got = float(printed.split("N_opt")[1].split()[0])
    assert got == pytest.approx(best, rel=0.02)
    size = min(sized.runs, key=lambda r: abs(math.log(r.size.params / got))).size
    assert f"nearest size    {size.name}" in printed
    steps = int(printed.split(" steps")[0].split()[-1])
    fps = next(r.flops_per_step for r in sized.runs if r.size == size)
    assert steps == int(c // fps)
    tokens = steps * next(r.tokens_per_step for r in sized.runs if r.size == size)
    assert float(printed.split("held-out loss")[1].split()[0]) == pytest.approx(float(law.loss(size.params, tokens)), abs=1e-4)
    words = shlex.split(printed.split("train it:")[1].strip().splitlines()[0])
    assert f"train.steps={steps}" in words and cli(capsys, *words[1:], "--dry-run")[0] == 0
    one_line_error(cli(capsys, "scale", "predict", tmp_path / "fit", "--flops", c, "--train"), "needs a sweep folder")
    one_line_error(cli(capsys, "scale", "predict", tmp_path, "--flops", c, "--seeds", 3), "go with --train")
