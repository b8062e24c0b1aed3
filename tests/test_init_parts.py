"""`train.init_parts`: any part of a model initialised from another run (graft/build.py), e.g. the
connector of a stage-1 run under a fresh LM."""


from graft.cli import main
from graft.trainer.checkpoint import read_model

QUIET = ["--set", "eval.splits=", "--set", "train.progress=false"]


def weights(run, prefix):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    return read_model(ckpt, prefix)


def test_a_part_comes_from_another_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "tiny", "--out", str(a), *QUIET, "--set", "train.steps=5", "--set", "optim.lr=1e-2"]) == 0
    # b: the connector from a, frozen so that it stays a's; everything else fresh and trained
    assert main(["train", "tiny", "--out", str(b), *QUIET, "--set", "train.steps=1",
                 "--set", f"train.init_parts={{connector: {a}}}", "--set", "train.freeze=[connector]"]) == 0
    got, want = weights(b, "connector."), weights(a, "connector.")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    lm_a, lm_b = weights(a, "lm.layers.0.mlp"), weights(b, "lm.layers.0.mlp")
    assert any((lm_a[k] != lm_b[k]).any() for k in lm_a)  # the LM is not a's
    for value, needle in ((f"{{nope: {a}}}", "unknown part 'nope'"), (f"{{lm: {tmp_path}}}", "not a graft run"),
                          ("[connector]", "expects a mapping")):
        assert main(["train", "tiny", "--out", str(tmp_path / "bad"), *QUIET, "--set", f"train.init_parts={value}"]) == 2
        assert needle in capsys.readouterr().err
    # a part that does not fit (linear vs MLP connector): one line naming the key
    assert main(["train", "tiny", "--out", str(tmp_path / "bad"), *QUIET, "--set", "train.steps=1",
                 "--set", "connector.kind=linear", "--set", f"train.init_parts={{connector: {a}}}"]) == 2
    assert "train.init_parts.connector" in capsys.readouterr().err


def test_a_tied_lm_comes_from_another_run(tmp_path):
    """The LM head tied to the token embeddings is saved once; init_parts lm fills both names."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "tiny", "--out", str(a), *QUIET, "--set", "train.steps=3", "--set", "optim.lr=1e-2"]) == 0
    assert main(["train", "tiny", "--out", str(b), *QUIET, "--set", "train.steps=1",
                 "--set", f"train.init_parts={{lm: {a}}}", "--set", "train.freeze=[lm]"]) == 0
    got, want = weights(b, "lm."), weights(a, "lm.")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
