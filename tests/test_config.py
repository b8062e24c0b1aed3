"""Config overrides and strict validation; the CLI's one-line errors with exit code 2."""

import subprocess
import sys

import pytest
from PIL import Image

from graft import config as C
from graft.errors import UserError
from graft.recipes import RECIPES


def test_overrides_set_typed_values():
    cfg = C.apply_overrides(RECIPES["shapes_vqa"](), [
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
        C.apply_overrides(RECIPES["shapes_vqa"](), [override])


def test_config_file_round_trip_and_strict_load(tmp_path):
    cfg = C.apply_overrides(RECIPES["tiny"](), ["lm.layers=2"])
    C.save(cfg, tmp_path / "config.yaml")
    assert C.load(tmp_path / "config.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("lm:\n  layers: 2\n  bogus: 1\n")
    with pytest.raises(UserError, match="unknown config key 'lm.bogus'"):
        C.load(tmp_path / "bad.yaml")


def graft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graft", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_user_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_errors_are_one_line_exit_2(tmp_path):
    assert_user_error(graft("train", "tiny", "--out", str(tmp_path / "r"), "--set", "lm.layerz=1"), "lm.layerz")
    assert_user_error(graft("train", "tiny", "--out", str(tmp_path / "r"), "--set", "optim.lr=abc"), "optim.lr")
    assert_user_error(graft("train", "nosuchrecipe"), "nosuchrecipe")
    assert_user_error(graft("eval", str(tmp_path / "missing_run")), "missing_run")
    assert_user_error(graft("train", "tiny", "--out", str(tmp_path / "r"), "--set", "train.freeze=[vision,connector,lm]"),
                      "train.freeze")
    assert not (tmp_path / "r").exists()  # nothing was written for a rejected config
    (tmp_path / "a_file").write_text("keep me")
    assert_user_error(graft("train", "tiny", "--out", str(tmp_path / "a_file")), "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_cli_generate_rejects_missing_and_non_image_files(tmp_path):
    run = tmp_path / "run"
    assert graft("train", "tiny", "--out", str(run), "--set", "train.steps=2", "--set", "train.progress=false",
                 "--set", "eval.vqa_per_type=1", "--set", "eval.captions=1").returncode == 0
    text = tmp_path / "notes.png"
    text.write_text("hello")
    assert_user_error(graft("generate", str(run), "--image", str(text), "--prompt", "hi"), "notes.png")
    assert_user_error(graft("generate", str(run), "--image", str(tmp_path / "no.png"), "--prompt", "hi"), "no.png")
    img = tmp_path / "ok.png"
    Image.new("P", (20, 20)).save(img)
    ok = graft("generate", str(run), "--image", str(img), "--prompt", "what color is the circle?")
    assert ok.returncode == 0, ok.stderr
    typed = graft("generate", str(run), "--image", str(img), "--prompt", "what is <image> here? <eos>")
    assert typed.returncode == 0, typed.stderr  # control-token strings in a prompt are plain text


def test_pack_defaults_to_the_built_in_world_and_fails_loudly_elsewhere():
    cfg = C.apply_overrides(RECIPES["shapes_vqa"](), ["data.source=webdataset", "data.shards=a.tar"])
    assert cfg.data.pack is None  # unset: the webdataset stream pads, no error
    assert C.apply_overrides(RECIPES["shapes_vqa"](), ["data.pack=false"]).data.pack is False
    with pytest.raises(UserError, match="data.pack=true needs data.source=shapes"):
        C.apply_overrides(RECIPES["shapes_vqa"](), ["data.pack=true", "data.source=webdataset", "data.shards=a.tar"])


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_valid_and_survives_its_yaml(name, tmp_path):
    """`graft recipes --show NAME` prints a config that loads back to the same one."""
    cfg = C.validate(RECIPES[name]())
    path = tmp_path / "config.yaml"
    C.save(cfg, path)
    assert C.load(path) == cfg
