"""How teachers are named and weighed (graft/distill.py): `distill.teachers` entries of the form
{from: RUN, weight: W}, and `distill.lambda`, the soft/hard mix. Each is checked by what it changes
in a real student run, against the same run spelled with the older keys, and bad values are one line."""

import json
import shutil

import pytest
import torch

from graft import config as C
from graft.cli import main
from graft.distill import loss_weights, teacher_weights
from graft.recipes import recipe
from tests.helpers import copy_run

SMALL = ["vision.hidden_size=32", "vision.layers=1", "vision.intermediate_size=64", "text.hidden_size=32",
         "text.layers=1", "text.intermediate_size=64", "train.progress=false", "train.log_every=1", "eval.splits=",
         "train.batch_size=16", "contrastive.embed_dim=16"]


def train(out, *sets, steps=3):
    args = [*SMALL, f"train.steps={steps}", f"train.ckpt_every={steps}", *sets]
    return main(["train", "clip", "--out", str(out), *(a for s in args for a in ("--set", s))])


def losses(out) -> list[dict]:
    """Each step's weighted loss and named losses, as logged."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")} for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two different 3-step CLIP runs (seeds 0 and 1) to teach with."""
    root = tmp_path_factory.mktemp("teachers")
    for seed in (0, 1):
        assert train(root / f"t{seed}", f"train.seed={seed}") == 0
    return root / "t0", root / "t1"


def test_entries_and_lambda_are_the_weights_they_name(tmp_path, teachers):
    """{from, weight} entries with distill.lambda=0.75 train exactly as distill.weights with
    train.objectives={itc: 0.25, distill_kd: 0.75}; without lambda (all weights 1) the loss differs,
    and other teacher weights change the distillation loss itself."""
    a, b = teachers
    entries = f"distill.teachers=[{{from: {a}, weight: 0.3}}, {{from: {b}, weight: 0.7}}]"
    assert train(tmp_path / "entries", entries, "distill.lambda=0.75", "distill.losses=[kd]") == 0
    assert train(tmp_path / "spelled", f"distill.teachers=[{a},{b}]", "distill.weights=[0.3,0.7]",
                 "distill.losses=[kd]", "train.objectives={itc: 0.25, distill_kd: 0.75}") == 0
    assert train(tmp_path / "unmixed", entries, "distill.losses=[kd]") == 0
    assert train(tmp_path / "swapped", f"distill.teachers=[{a},{b}]", "distill.weights=[0.7,0.3]",
                 "distill.losses=[kd]", "distill.lambda=0.75") == 0
    mixed = losses(tmp_path / "entries")
    assert len(mixed) == 3 and mixed == losses(tmp_path / "spelled")
    unmixed = losses(tmp_path / "unmixed")
    assert unmixed[0]["loss/distill_kd"] == mixed[0]["loss/distill_kd"]  # the same first step, weighed otherwise
    assert unmixed[0]["loss"] == pytest.approx(mixed[0]["loss/itc"] + mixed[0]["loss/distill_kd"], rel=1e-6)
    assert mixed[0]["loss"] == pytest.approx(0.25 * mixed[0]["loss/itc"] + 0.75 * mixed[0]["loss/distill_kd"], rel=1e-6)
    assert losses(tmp_path / "swapped")[0]["loss/distill_kd"] != mixed[0]["loss/distill_kd"]
    saved = C.read(tmp_path / "entries" / "config.yaml")  # written as `lambda:`, read back
    assert "lambda: 0.75" in (tmp_path / "entries" / "config.yaml").read_text()
    assert saved.distill.lambda_ == 0.75 and saved.distill.paths == [str(a), str(b)]
    assert teacher_weights(saved.distill) == [0.3, 0.7]


def test_lambda_weighs_every_other_loss_by_its_complement():
    cfg = recipe("clip", [])
    cfg.distill.teachers, cfg.distill.lambda_ = ["runs/a"], 0.9  # loss_weights reads no teacher
    cfg.train.objectives = {"distill_fd": 2000}
    weights = loss_weights(cfg, ["itc", "itm", "distill_fd", "distill_icl"])
    assert weights == pytest.approx({"itc": 0.1, "itm": 0.1, "distill_fd": 1800, "distill_icl": 0.9})
    assert loss_weights(recipe("clip", ["train.objectives={itc: 2}"]), ["itc", "mlm"]) == {"itc": 2, "mlm": 1}


@pytest.mark.parametrize("sets, needle", [
    (["distill.teachers=[{from: A, weight: -0.5}, {from: B, weight: 1.5}]"], "weight -0.5 of A must be finite and non-negative"),
    (["distill.teachers=[{from: A, weight: .nan}]"], "weight nan of A must be finite"),
    (["distill.teachers=[{from: A, weight: heavy}]"], "weight 'heavy' of A is not a number"),
    (["distill.teachers=[{from: A, wieght: 1}]"], "unknown key 'wieght'"),
    (["distill.teachers=[{weight: 1}]"], "(no 'from')"),
    (["distill.teachers=[{from: A, weight: 1}, B]"], "give every entry a weight or none"),
    (["distill.teachers=[{from: A, weight: 0.5}, {from: B, weight: 0.4}]"], "weights [0.5, 0.4] must be non-negative and sum to 1"),
    (["distill.teachers=[{from: A, weight: 1}]", "distill.weights=[1]"], "give one of them"),
    (["distill.teachers=[A]", "distill.lambda=1.5"], "distill.lambda=1.5 must be between 0 and 1"),
    (["distill.lambda=0.5"], "distill.lambda has no effect without distill.teachers"),
])
def test_bad_teacher_entries_and_lambda_are_one_line_exit_2(tmp_path, capsys, sets, needle):
    out = tmp_path / "run"
    assert train(out, *sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


# ---- precomputed teacher outputs (graft/teacher_store.py) ------------------------------------------

STORE_STEPS = 6
LOSSES = "distill.losses=[fd,icl,crd,kd,dense]"


def entries(a, b, alpha=0.3):
    return f"distill.teachers=[{{from: {a}, weight: {alpha}}}, {{from: {b}, weight: {1 - alpha:.1f}}}]"


def precompute(out, *sets):
    args = [*SMALL, f"train.steps={STORE_STEPS}", *sets]
    return main(["distill", "precompute", "clip", "--out", str(out), *(a for s in args for a in ("--set", s))])


@pytest.fixture(scope="module")
def store(tmp_path_factory, teachers):
    out = tmp_path_factory.mktemp("store") / "store"
    assert precompute(out, entries(*teachers), LOSSES) == 0
    return out


def tensors(out, step=STORE_STEPS):
    from graft.trainer.checkpoint import read_model

    return read_model(out / "checkpoints" / f"step_{step:08d}")


def test_precomputed_outputs_train_exactly_as_the_live_teachers(tmp_path, teachers, store):
    """All five losses read from the store give the live teachers' losses and weights bit for bit,
    with no teacher FLOPs; one store serves other teacher weights and lambda too."""
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["records"] == STORE_STEPS * 16 and manifest["outputs"] == [["row", "row", "one", "row"]] * 2
    for name, alpha in (("a", 0.3), ("b", 0.8)):
        sets = [entries(*teachers, alpha), LOSSES, f"train.steps={STORE_STEPS}", "distill.lambda=0.9"]
        assert train(tmp_path / f"live_{name}", *sets, steps=STORE_STEPS) == 0
        assert train(tmp_path / f"stored_{name}", *sets, f"distill.precomputed={store}", steps=STORE_STEPS) == 0
        live, stored = losses(tmp_path / f"live_{name}"), losses(tmp_path / f"stored_{name}")
        assert len(live) == STORE_STEPS and live == stored
        mine, theirs = tensors(tmp_path / f"live_{name}"), tensors(tmp_path / f"stored_{name}")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        rows = [json.loads(line) for line in (tmp_path / f"stored_{name}" / "metrics.jsonl").read_text().splitlines()]
        assert not any("teacher_flops_per_s" in r for r in rows)  # no teacher ran
    assert losses(tmp_path / "stored_a") != losses(tmp_path / "stored_b")
    b = teachers[1]  # one of the store's teachers alone
    assert train(tmp_path / "live_one", f"distill.teachers=[{b}]", LOSSES, steps=3) == 0
    assert train(tmp_path / "stored_one", f"distill.teachers=[{b}]", LOSSES, f"distill.precomputed={store}", steps=3) == 0
    assert losses(tmp_path / "live_one") == losses(tmp_path / "stored_one")


def test_a_run_reading_the_store_resumes_exactly(tmp_path, teachers, store):
    sets = [entries(*teachers), LOSSES, f"distill.precomputed={store}"]
    whole = tmp_path / "whole"
    assert train(whole, *sets, steps=STORE_STEPS) == 0
    half = tmp_path / "half"  # the same run stopped after its step-3 checkpoint, then the same command again
    assert train(half, *sets, "train.ckpt_every=3", steps=STORE_STEPS) == 0
    shutil.rmtree(half / "checkpoints" / f"step_{STORE_STEPS:08d}")
    assert train(half, *sets, "train.ckpt_every=3", steps=STORE_STEPS) == 0
    mine, theirs = tensors(whole), tensors(half)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_store_of_other_teachers_data_or_records_is_refused_in_one_line(tmp_path, capsys, teachers, store):
    a, b = teachers
    moved = copy_run(a, tmp_path / "moved")  # a teacher that trains on after its outputs were stored
    assert precompute(tmp_path / "of_moved", f"distill.teachers=[{moved}]") == 0
    assert train(moved, "train.seed=0", steps=4) == 0
    capsys.readouterr()
    cases = [([entries(a, b), f"distill.precomputed={store}", "distill.losses=[fd]", "data.seed=1"],
              "computed over other data or settings (data.seed=0 there, 1 here)"),
             ([entries(a, b), f"distill.precomputed={store}", "vision.image_size=32"], "(vision.image_size=24 there, 32 here)"),
             ([f"distill.teachers=[{a},{tmp_path / 'moved'}]", f"distill.precomputed={store}"], "not of all of this run's"),
             ([f"distill.teachers=[{moved}]", f"distill.precomputed={tmp_path / 'of_moved'}"], "from another state of"),
             ([f"distill.teachers=[{moved}]", f"distill.precomputed={tmp_path / 'of_moved'}"][:1]
              + [f"distill.precomputed={tmp_path}"], "is not a folder written by graft distill precompute"),
             ([f"distill.precomputed={store}"], "distill.precomputed has no effect without distill.teachers")]
    for sets, needle in cases:
        assert train(tmp_path / "run", *sets) == 2, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (sets, err)
        assert not (tmp_path / "run").exists()
    # a run longer than the store fails the step after its last stored record, in one line
    assert train(tmp_path / "longer", entries(a, b), LOSSES, f"distill.precomputed={store}", "train.ckpt_every=3",
                 steps=STORE_STEPS + 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no teacher outputs for 16 of this batch's 16 records" in err[0], err
    assert (tmp_path / "longer" / "checkpoints" / f"step_{STORE_STEPS:08d}").is_dir()  # the steps before it are kept


def test_precompute_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys, teachers, store):
    a = teachers[0]
    cases = [(tmp_path / "x", [], "the run has no distill.teachers"),
             (store, [f"distill.teachers=[{a}]"], "exists: graft distill precompute writes a new folder"),
             (tmp_path / "y", [entries(*teachers), LOSSES, f"distill.precomputed={store}"], "leave it out")]
    for out, sets, needle in cases:
        assert precompute(out, *sets) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (sets, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main(["train", "tiny", "--out", str(tmp_path / "vlm"), "--set", f"distill.teachers=[{a}]",
                 "--set", f"distill.precomputed={store}"]) == 2
    assert "per answer token, not per record" in capsys.readouterr().err
