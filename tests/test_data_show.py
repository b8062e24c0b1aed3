"""`graft data show`: the recipe's own records drawn to a PNG, with a trained VLM's answers on request."""

import pytest
from PIL import Image

from graft.cli import main
from graft.data.show import RIGHT, WRONG, Record, cell_lines, show
from graft.recipes import clip, tiny
from tests.data_helpers import good_records, write_tar

QUIET = ["--set", "eval.splits=", "--set", "train.progress=false"]
TINY_DUAL = [f"--set={part}.{key}={value}" for part in ("vision", "text")
             for key, value in (("hidden_size", 32), ("layers", 1), ("intermediate_size", 64))]


def test_builtin_world_draws_a_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "show", "shapes_vqa", "--n", "6", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "6 samples drawn" in line and "skipped: none" in line and str(out) in line
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 300


@pytest.fixture
def shards(tmp_path):
    records = good_records("g", 4)
    captions = ["a zebra beside a small red circle", r"cost: $\frac{1}{2}$ and $$ unbalanced $", "long " * 1000]
    for (_, members), text in zip(records, captions):
        members["txt"] = text.encode()
    write_tar(tmp_path / "s-0.tar", records)
    png = records[0][1]["png"]
    write_tar(tmp_path / "s-1.tar", [("broken", {"png": png[: len(png) // 2], "txt": b"a zebra"}),
                                     *good_records("h", 2)])
    return ["--set", "data.source=webdataset", "--set", f'data.shards=["{tmp_path}/s-{{0..1}}.tar"]']


def test_user_shards_are_what_is_drawn(tmp_path, shards, capsys):
    out = tmp_path / "user.png"
    assert main(["data", "show", "clip", *shards, "--n", "7", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "6 samples drawn" in line and "1 image_truncated" in line
    assert Image.open(out).format == "PNG"

    from graft.config_checks import apply_overrides

    shown = show(apply_overrides(clip(), shards[1::2]), 7, tmp_path / "direct.png")
    assert len(shown.texts) == 6 and shown.skipped["image_truncated"] == 1
    assert any("zebra" in t for t in shown.texts)  # the user's captions, not the built-in world's
    assert any("cost: $" in t and "frac{1}{2}$" in t for t in shown.texts)  # plain text (backslash escaped)
    assert all(len(t) < 1000 for t in shown.texts)  # the 5,000-character caption is cut to the cell


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("show") / "tiny"
    assert main(["train", "tiny", "--out", str(run), *QUIET]) == 0
    return run


def test_run_answers_are_drawn_and_marked(tiny_run, tmp_path, capsys):
    shown = show(tiny(), 3, tmp_path / "answers.png", run=str(tiny_run))
    assert shown.asked == 9  # three turns drawn per sample, each asked
    assert sum("model: " in t for t in shown.texts) == 3
    assert f"model right on {shown.right} of 9 answers" in shown.line()
    assert main(["data", "show", "tiny", "--n", "2", "--run", str(tiny_run), "--out", str(tmp_path / "b.png")]) == 0
    assert "model right on" in capsys.readouterr().out


def test_answers_are_marked_after_normalising():
    r = Record("k", Image.new("RGB", (24, 24)), [("q1", "red"), ("q2", "yes"), ("q3", "2")], ["Red.", "no", None])
    lines = cell_lines(r, dual=False)
    assert ("model: Red. ✓", RIGHT) in lines and ("model: no ✗", WRONG) in lines
    assert ("model: (question not encodable)", WRONG) in lines


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    dual = tmp_path / "dual"
    assert main(["train", "clip", "--out", str(dual), *QUIET, *TINY_DUAL, "--set", "train.steps=1",
                 "--set", "train.batch_size=8"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "x.png")
    cases = [
        (["shapes_vqa", "--run", str(dual)], "dual model"),
        (["shapes_vqa", "--n", "0"], "--n=0"),
        (["no_such_recipe"], "unknown recipe"),
        (["clip", "--set", "data.source=webdataset", "--set", f'data.shards=["{tmp_path}/none-{{0..2}}.tar"]'],
         "3 shard_missing"),
    ]
    for args, words in cases:
        assert main(["data", "show", *args, "--out", out]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("graft: error:") and words in err and "\n" not in err, err
    assert main(["data", "show", "shapes_vqa", "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_picks_the_built_in_worlds_held_out_samples(tmp_path, shards, capsys):
    train, test = (show(tiny(), 2, tmp_path / f"{s}.png", split=s) for s in ("train", "test"))
    assert train.texts != test.texts and test.texts[0].startswith("test #0") and train.texts[0].startswith("train #0")
    for extra, needle in ((["--split", "nope"], "not a split"), (["--split", "test", *shards], "splits are the built-in world's")):
        assert main(["data", "show", "tiny", "--out", str(tmp_path / "x.png"), *extra]) == 2
        assert needle in capsys.readouterr().err


def test_a_clip_is_drawn_as_a_strip_of_its_frames_and_the_model_reads_them_all(tmp_path):
    """`motion_vqa`'s records: each drawn as its frames side by side, in order; asked with --run,
    the model gets every frame (its prompt holds three images' tokens), not the first alone."""
    from graft.config_checks import apply_overrides
    from graft.data.motion import MotionWorld
    from graft.data.show import stream_records
    from graft.eval import vqa
    from graft.recipes import motion_vqa

    cfg = apply_overrides(motion_vqa(), ["lm.layers=1", "lm.hidden_size=32", "lm.intermediate_size=64"])
    (record,), _ = stream_records(cfg, 1)
    frames = MotionWorld(24, 3, 2, 3, 0).sample("train", 0).frames
    assert record.items and [f.tobytes() for f in record.items] == [f.tobytes() for f in frames]
    gap = (record.image.width - 3 * 24) // 2
    assert record.image.size == (3 * 24 + 2 * gap, 24) and gap >= 1
    for k, frame in enumerate(frames):
        assert record.image.crop((k * (24 + gap), 0, k * (24 + gap) + 24, 24)).tobytes() == frame.tobytes()

    run = tmp_path / "run"
    assert main(["train", "motion_vqa", "--out", str(run), "--set", "train.steps=1", *QUIET,
                 "--set", "lm.layers=1", "--set", "lm.hidden_size=32", "--set", "lm.intermediate_size=64"]) == 0
    seen = []
    real = vqa._encoded
    try:
        vqa._encoded = lambda proc, prompt: seen.append(len(prompt[0])) or real(proc, prompt)
        shown = show(cfg, 2, tmp_path / "clips.png", run=str(run))
    finally:
        vqa._encoded = real
    assert shown.asked >= 2 and seen and set(seen) == {3}
