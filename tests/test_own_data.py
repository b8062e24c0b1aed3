"""Every design trains on the user's data when `data.*` names it (issue 12): the batches come from
the configured shards, not from the built-in world, for the VLM and for every dual encoder."""

import json
from types import SimpleNamespace

import pytest

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.build import build_stream
from graft.data.check import processor_for
from graft.data.tokenizer import ChatTokenizer
from graft.recipes import RECIPES
from graft.trainer.metrics import read
from tests.data_helpers import encoded, write_tar

from graft.data.shapes import ShapesWorld

WORDS = ["zebra", "lighthouse", "violin", "glacier"]  # words the built-in world never uses


def caption(i: int) -> str:
    return f"a {WORDS[i % 4]} beside a {WORDS[(i + 1) % 4]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    world = ShapesWorld(image_size=24, grid=3, seed=7)
    records = [(f"k{i:04d}", {"png": encoded(world.sample("train", i).image), "txt": caption(i).encode()})
               for i in range(64)]
    write_tar(root / "own-0.tar", records[:32])
    write_tar(root / "own-1.tar", records[32:])
    return f"{root}/own-{{0..1}}.tar", {f"k{i:04d}": caption(i) for i in range(64)}


SMALL = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.progress=false",
         "eval.splits=", "eval.zeroshot_images=0", "eval.retrieval_pairs=0", "data.workers=0",
         "train.peak_flops=1e11"]


def own(recipe: str, pattern: str, *extra: str):
    return apply_overrides(RECIPES[recipe](), ["data.source=webdataset", f'data.shards=["{pattern}"]', *SMALL, *extra])


@pytest.mark.parametrize("recipe", ["tiny", "clip", "siglip", "clippo"])
def test_each_design_batches_the_configured_shards(recipe, shards):
    pattern, captions = shards
    cfg = own(recipe, pattern)
    proc = processor_for(cfg)
    assert len(proc.tok.encode(" zebra")) <= 2  # the tokenizer was trained on the shards' captions
    stream = build_stream(cfg, proc, SimpleNamespace(rank=0, world_size=1, device="cpu"))
    batch = stream.batch(0, 0)
    expected = [captions[key.rsplit(":", 1)[1]] for key in stream.last_keys]
    assert len(expected) == 8
    if "text_pixels" in batch:  # CLIPPO: the shards' captions, rendered
        assert batch["text_pixels"].equal(proc.texts(expected)["text_pixels"])
    elif cfg.model == "dual":
        assert [proc.tok.decode(row.tolist()) for row in batch["input_ids"]] == expected
    else:
        decoded = [proc.tok.decode(row.tolist()) for row in batch["input_ids"]]
        assert all(c in d for c, d in zip(expected, decoded)), decoded
    stream.close()


@pytest.mark.parametrize("recipe", ["clip", "clippo"])
def test_dual_encoders_train_on_shards_through_the_cli(recipe, shards, tmp_path):
    pattern, _ = shards
    run = tmp_path / recipe
    sets = [x for kv in ["data.source=webdataset", f'data.shards=["{pattern}"]', *SMALL] for x in ("--set", kv)]
    assert main(["train", recipe, "--out", str(run), *sets]) == 0
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["data"]["ranks"][0]["used"] == 16  # two steps of 8 records, from the shards' stream
    assert "data_skipped" in [r for r in read(run) if r.get("event") != "eval"][-1]
    assert len(ChatTokenizer.load(run / "tokenizer.json").encode(" lighthouse")) <= 2

    lit = tmp_path / "lit"  # LiT locks this tower and trains a text tower on the same shards
    if recipe == "clip":
        assert main(["train", "lit", "--out", str(lit), *sets, "--set", f"vision.init_from={run}"]) == 0
        assert json.loads((lit / "checkpoints" / "step_00000002" / "meta.json").read_text())["data"]


def test_missing_shards_stop_a_dual_encoder_run(tmp_path, capsys):
    sets = [x for kv in ["data.source=webdataset", f'data.shards=["{tmp_path}/none-{{0..1}}.tar"]', *SMALL]
            for x in ("--set", kv)]
    assert main(["train", "clip", "--out", str(tmp_path / "run"), *sets]) == 2
    assert "shard_missing=2" in capsys.readouterr().err.strip().splitlines()[-1]


def test_printed_train_command_is_shell_safe_and_trains(tmp_path, capsys):
    import shlex

    out = tmp_path / "exported"
    assert main(["data", "export-shapes", "--format", "webdataset", "--out", str(out), "--n", "24", "--shard-size", "12"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(line.removeprefix("train on them: "))  # what a shell makes of the pasted line
    assert argv[:3] == ["graft", "train", "shapes_vqa"] and "--out" in argv
    assert f"data.shards={out}/shapes-{{000000..000001}}.tar" in argv  # braces survive the shell
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    assert main([*argv[1:], *[x for kv in SMALL for x in ("--set", kv)]]) == 0
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_recipes_show_prints_the_resolved_config(capsys):
    import yaml

    assert main(["recipes", "--show", "clip", "--set", "text.layers=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "clip" and shown["text"]["layers"] == 3 and shown["model"] == "dual"
    assert main(["recipes", "--show", "nope"]) == 2
