"""How teachers are named and weighed (graft/distill.py): `distill.teachers` entries of the form
{from: RUN, weight: W}, and `distill.lambda`, the soft/hard mix. Each is checked by what it changes
in a real student run, against the same run spelled with the older keys, and bad values are one line."""

import json

import pytest

from graft import config as C
from graft.cli import main
from graft.distill import loss_weights, teacher_weights
from graft.recipes import recipe

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
