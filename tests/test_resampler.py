"""The Perceiver Resampler connector (graft/models/resampler.py): the same function as HF
`Idefics2Connector`, N tokens whatever the patch grid, gradients to the latents, one-line errors
for bad settings, and a short `shapes_resampler` run that learns from the images."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the HF module is built from a config

import json

import pytest
import torch

from graft.cli import main
from graft.losses import batch_loss
from graft.models.connectors import ConnectorConfig, build_connector
from graft.models.resampler import EPS, ResamplerConnector
from tests.helpers import tiny_vlm

ATOL = 1e-5  # fp32


def hf_connector(vision_dim: int, lm_dim: int, cfg: ConnectorConfig):
    """HF's Idefics2Connector with the settings graft's resampler fixes (module docstring)."""
    from transformers.models.idefics2.configuration_idefics2 import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    config = Idefics2Config(
        vision_config=dict(hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_hidden_layers=1,
                           num_attention_heads=4),
        # The modality projection's hidden size is the LM's intermediate_size: 4 x the width here.
        text_config=dict(model_type="mistral", hidden_size=lm_dim, intermediate_size=4 * lm_dim, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", vocab_size=64),
        perceiver_config=dict(hidden_size=lm_dim, rms_norm_eps=EPS, hidden_act="silu",
                              resampler_n_latents=cfg.latents, resampler_depth=cfg.layers,
                              resampler_n_heads=cfg.heads, resampler_head_dim=lm_dim // cfg.heads,
                              num_key_value_heads=cfg.heads),
    )
    config.perceiver_config._attn_implementation = "eager"  # not graft's SDPA path
    return Idefics2Connector(config).eval()


@pytest.mark.parametrize("patches", [9, 36])
def test_matches_hf_idefics2_connector(patches):
    cfg = ConnectorConfig("resampler", latents=5, layers=2, heads=4)
    torch.manual_seed(0)
    ours = ResamplerConnector(48, 64, cfg).eval()
    with torch.no_grad():  # random everywhere; norm scales near 1 but not 1
        for name, p in ours.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf = hf_connector(48, 64, cfg)
    assert sorted(hf.state_dict()) == sorted(ours.state_dict())  # HF's names: the key map is the identity
    hf.load_state_dict(ours.state_dict(), strict=True)

    x = torch.randn(3, patches, 48)
    with torch.no_grad():
        got, want = ours(x), hf(x, attention_mask=torch.ones(3, patches, dtype=torch.long))
    assert got.shape == want.shape == (3, 5, 64)
    assert (got - want).abs().max().item() <= ATOL


def test_num_tokens_does_not_depend_on_the_patch_grid():
    cfg = ConnectorConfig("resampler", latents=6, layers=1, heads=2)
    conn = build_connector(cfg, 32, 16)
    for patches in (4, 64):
        assert conn.num_tokens(patches) == 6
        assert conn(torch.randn(2, patches, 32)).shape == (2, 6, 16)


def test_gradients_reach_the_latents():
    torch.manual_seed(0)
    model, proc = tiny_vlm("resampler")
    assert model.num_image_tokens == ConnectorConfig().latents  # 16 latents from 16 patches
    convs = [proc.conversation([("what color is the circle?", "red")]) for _ in range(2)]
    batch = {"input_ids": torch.tensor([c[0] for c in convs]), "labels": torch.tensor([c[1] for c in convs]),
             "pixel_values": torch.randn(2, 3, 32, 32)}
    batch_loss(model, batch).backward()
    latents = model.connector.perceiver_resampler.latents
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # and through it, the tower


# shapes_resampler: 24 px images, 8 px patches: 9 patches, LM width 128.
@pytest.mark.parametrize("setting, message", [
    ("connector.latents=0", "connector.latents=0 must be at least 1"),
    ("connector.latents=37", "connector.latents=37 is more than 4 x the 9 patches"),
    ("connector.layers=0", "connector.layers=0 must be at least 1"),
    ("connector.heads=0", "connector.heads=0 must be at least 1"),
])
def test_bad_settings_are_one_line_before_anything_is_written(setting, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "shapes_resampler", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_heads_must_divide_the_lm_width(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "shapes_resampler", "--out", str(out), "--set", "connector.heads=7",
                 "--set", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "connector.heads=7 does not divide the LM width 128" in err[0], err
    assert not out.exists()  # refused with the config checks, before anything is written


STEPS = 200
HALF_WIDTH = ["vision.hidden_size=64", "vision.intermediate_size=256", "lm.hidden_size=64", "lm.intermediate_size=192"]


@pytest.mark.slow
def test_short_resampler_run_reads_the_image(tmp_path):
    """Image information gets through a fresh resampler to the LM (`graft train shapes_resampler`
    at half width, one object per image, 200 steps): colour well above what the text alone allows
    (1/5: one colour of each shape is held out of the test split; a blank-image shapes_vqa run got
    0.14). A fresh resampler learns colour slowly (the mlp connector: 0.98-1.00 in the same run);
    why is open: neither a higher lr (5e-3), a smaller model nor latents initialised at std 0.02
    instead of 1 helped at full width (measured below)."""
    run = tmp_path / "run"
    sets = [f"train.steps={STEPS}", "train.batch_size=32", "train.log_every=20", f"train.ckpt_every={STEPS}",
            "train.progress=false", "data.max_objects=1", "eval.vqa_per_type=100", "eval.captions=0",
            "eval.splits=[test]", *HALF_WIDTH]
    assert main(["train", "shapes_resampler", "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    results = json.loads((run / "eval.json").read_text())
    # 100 questions: a blind 0.2 reaches 0.45 about once in 10 million runs (6 standard deviations).
    # Half width, train.seed 0-3, one thread, Intel Xeon (25 s a run): colour 0.59, 0.79, 0.85,
    # 0.53; size 0.64, 0.59, 0.71, 1.00, too near its 1/2 ceiling for a bar. At full width (50 s):
    # colour 0.34, 0.38, 0.54; size 1.00, 0.81, 0.77 (latents at std 0.02: colour 0.37, 0.16, 0.42).
    assert results["vqa_acc/color"] >= 0.45, results
