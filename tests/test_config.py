"""Config overrides and strict validation; the CLI's one-line errors with exit code 2."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from graft import config as C
from graft import config_checks as checks
from graft.errors import UserError
from graft.recipes import RECIPES
from tests.helpers import cli, one_line_error


def test_overrides_set_typed_values():
    cfg = checks.apply_overrides(RECIPES["shapes_vqa"](), [
        "lm.layers=5", "optim.lr=3e-4", "train.freeze=vision,lm", "train.progress=false",
        "connector.kind=linear", "train.init_from=none", "name=007",
    ])
    assert cfg.lm.layers == 5 and isinstance(cfg.lm.layers, int)
    assert cfg.optim.lr == 3e-4
    assert cfg.train.freeze == ["vision", "lm"]
    assert cfg.train.progress is False
    assert cfg.connector.kind == "linear"
    assert cfg.train.init_from is None
    assert cfg.name == "007"


@pytest.mark.parametrize("override,message", [
    ("lm.layerz=3", "unknown config key 'lm.layerz'"),
    ("modle.x=1", "unknown config key 'modle.x'"),
    ("lm.layers=three", "'lm.layers' expects an integer"),
    ("lm.layers=2.5", "'lm.layers' expects an integer"),
    ("optim.lr=fast", "'optim.lr' expects a number"),
    ("train.progress=maybe", "'train.progress' expects true/false"),
    ("lm=3", "'lm' is a section"),
    ("lm.layers", "not of the form key=value"),
    ("connector.kind=nope", "connector.kind='nope'"),
    ("train.freeze=vison", "unknown part 'vison'"),
    ("vision.patch_size=7", "not divisible by vision.patch_size=7"),
    ("lm.kv_heads=3", "lm.kv_heads=3"),
    ("train.precision=fp8", "train.precision='fp8'"),
    ("data.tokenizer=/no/such/tokenizer.json", "/no/such/tokenizer.json"),
    ("eval.splits=test,tset", "unknown split 'tset'"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        checks.apply_overrides(RECIPES["shapes_vqa"](), [override])


def test_config_file_round_trip_and_strict_load(tmp_path):
    cfg = checks.apply_overrides(RECIPES["tiny"](), ["lm.layers=2"])
    C.save(cfg, tmp_path / "config.yaml")
    assert checks.load(tmp_path / "config.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("lm:\n  layers: 2\n  bogus: 1\n")
    with pytest.raises(UserError, match="unknown config key 'lm.bogus'"):
        checks.load(tmp_path / "bad.yaml")


def test_a_cli_error_in_a_real_process_is_one_line_exit_2(tmp_path):
    """The one real process among the CLI's error paths (the rest run in-process, tests.helpers.cli):
    the installed entry point, its exit code and its stderr, with nothing written."""
    done = subprocess.run([sys.executable, "-m", "graft", "train", "tiny", "--out", str(tmp_path / "r"),
                           "--set", "lm.layerz=1"], capture_output=True, text=True, timeout=120)
    one_line_error((done.returncode, done.stdout, done.stderr), "lm.layerz")
    assert not (tmp_path / "r").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "r", "--set", "optim.lr=abc"), "optim.lr")
    one_line_error(cli(capsys, "train", "nosuchrecipe"), "nosuchrecipe")
    one_line_error(cli(capsys, "eval", tmp_path / "missing_run"), "missing_run")
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "r", "--set", "train.freeze=[vision,connector,lm]"),
                   "train.freeze")
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "r", "--set", "parallel.compile=true",
                       "--set", "parallel.compile_backend=tvm"), "parallel.compile_backend='tvm' is not one of inductor")
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "r", "--set", "parallel.compile_backend=eager"),
                   "parallel.compile_backend=eager has no effect without parallel.compile=true")
    assert not (tmp_path / "r").exists()  # nothing was written for a rejected config
    (tmp_path / "a_file").write_text("keep me")
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "a_file"), "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_cli_generate_rejects_missing_and_non_image_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", "tiny", "--out", run, "--set", "train.steps=2", "--set", "train.progress=false",
               "--set", "eval.vqa_per_type=1", "--set", "eval.captions=1")[0] == 0
    text = tmp_path / "notes.png"
    text.write_text("hello")
    one_line_error(cli(capsys, "generate", run, "--image", text, "--prompt", "hi"), "notes.png")
    one_line_error(cli(capsys, "generate", run, "--image", tmp_path / "no.png", "--prompt", "hi"), "no.png")
    img = tmp_path / "ok.png"
    Image.new("P", (20, 20)).save(img)
    code, out, err = cli(capsys, "generate", run, "--image", img, "--prompt", "what color is the circle?")
    assert code == 0 and out.endswith("\n"), err  # the answer (a 2-step model may say nothing)
    code, _, err = cli(capsys, "generate", run, "--image", img, "--prompt", "what is <image> here? <eos>")
    assert code == 0, err  # control-token strings in a prompt are plain text
    one_line_error(cli(capsys, "generate", run, "--prompt", "hi"), "takes one of --image FILE or --series FILE")
    series = tmp_path / "rec.npy"
    np.save(series, np.zeros((6, 256), dtype=np.float32))
    one_line_error(cli(capsys, "generate", run, "--series", series, "--prompt", "hi"), "reads image items")


def test_pack_defaults_to_the_built_in_world_and_fails_loudly_elsewhere():
    cfg = checks.apply_overrides(RECIPES["shapes_vqa"](), ["data.source=webdataset", "data.shards=a.tar"])
    assert cfg.data.pack is None  # unset: the webdataset stream pads, no error
    assert checks.apply_overrides(RECIPES["shapes_vqa"](), ["data.pack=false"]).data.pack is False
    with pytest.raises(UserError, match="data.pack=true needs data.source=shapes"):
        checks.apply_overrides(RECIPES["shapes_vqa"](), ["data.pack=true", "data.source=webdataset", "data.shards=a.tar"])


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_valid_and_survives_its_yaml(name, tmp_path):
    """`graft recipes --show NAME` prints a config that loads back to the same one."""
    cfg = checks.validate(RECIPES[name]())
    path = tmp_path / "config.yaml"
    C.save(cfg, path)
    assert checks.load(path) == cfg
