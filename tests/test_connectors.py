"""Token-compressing connectors (graft/models/compress.py): pixel shuffle against HF
`Idefics3Connector` with the same weights, average pooling against the MLP projector and by hand,
the grid checks as one-line CLI errors, and a short run of each recipe that must learn."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the HF connector is built from a config

import pytest
import torch
from transformers import Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from graft.cli import main
from graft.errors import UserError
from graft.losses import batch_loss
from graft.models.compress import AvgPoolProjector, avg_pool, pixel_shuffle
from graft.models.connectors import ConnectorConfig, MLPProjector, build_connector, check_connector
from graft.models.decoder import LMConfig
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM
from graft.recipes import RECIPES
from tests.helpers import tokenizer

ATOL = 1e-5  # fp32


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- pixel shuffle -----------------------------------------------------------------------------


def idefics3_connector(vision_dim: int, lm_dim: int, r: int) -> Idefics3Connector:
    config = Idefics3Config(
        vision_config={"hidden_size": vision_dim, "num_attention_heads": 4},
        text_config={"hidden_size": lm_dim, "num_attention_heads": 4, "num_key_value_heads": 4},
        scale_factor=r,
    )
    return Idefics3Connector(config).eval()


@pytest.mark.parametrize("r, side", [(2, 4), (2, 6), (3, 6), (4, 8), (1, 3)])
def test_pixel_shuffle_matches_idefics3(r, side):
    torch.manual_seed(r * 10 + side)
    ours = build_connector(ConnectorConfig("pixel_shuffle", scale_factor=r), 16, 48, side * side).eval()
    hf = idefics3_connector(16, 48, r)
    # Our weight names are HF's without the `modality_projection.` prefix.
    hf.load_state_dict({"modality_projection." + k: v for k, v in ours.state_dict().items()}, strict=True)

    x = torch.randn(3, side * side, 16)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (3, ours.num_tokens(side * side), 48) == (3, (side // r) ** 2, 48)
        assert max_diff(out, hf(x)) <= ATOL
        # The grid order matters: the same patches read column-major give another function.
        if r > 1:
            transposed = x.view(3, side, side, 16).transpose(1, 2).reshape_as(x)
            assert max_diff(ours(transposed), hf(x)) > 1e-2


def test_pixel_shuffle_by_hand():
    # A 4x4 grid of 1-d features 0..15, r = 2: token (i, j) is its 2x2 block, row by row.
    x = torch.arange(16.0).view(1, 16, 1)
    assert pixel_shuffle(x, 2)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


# --- average pooling ---------------------------------------------------------------------------


def test_avgpool_by_hand():
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid
    assert avg_pool(x, 2)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 blocks
    x = torch.arange(9.0).view(1, 9, 1)  # a 3x3 grid to 2x2: adaptive bins overlap in the middle row/column
    assert avg_pool(x, 2)[0, :, 0].tolist() == [2.0, 3.0, 5.0, 6.0]  # e.g. mean(0, 1, 3, 4) = 2


def test_avgpool_to_every_patch_is_the_mlp_projector():
    torch.manual_seed(0)
    mlp = MLPProjector(16, 32)
    pool = AvgPoolProjector(16, 32, ConnectorConfig("avgpool", tokens=16))
    pool.mlp.load_state_dict(mlp.state_dict(), strict=True)
    x = torch.randn(2, 16, 16)
    assert max_diff(pool(x), mlp(x)) <= ATOL
    pool4 = AvgPoolProjector(16, 32, ConnectorConfig("avgpool", tokens=4))
    pool4.mlp.load_state_dict(mlp.state_dict(), strict=True)
    assert max_diff(pool4(x), mlp(avg_pool(x, 2))) <= ATOL and pool4.num_tokens(16) == 4


# --- in the VLM --------------------------------------------------------------------------------


@pytest.mark.parametrize("connector, tokens", [(ConnectorConfig("pixel_shuffle", scale_factor=2), 4),
                                               (ConnectorConfig("avgpool", tokens=4), 4),
                                               (ConnectorConfig("avgpool", tokens=1), 1)])
def test_vlm_with_a_compressing_connector(connector, tokens):
    from graft.data.processor import Processor

    torch.manual_seed(0)
    tok = tokenizer()
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, layers=1, heads=2, intermediate_size=64)
    lm = LMConfig(vocab_size=len(tok), hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64)
    model = VLM(vision, connector, lm, tok.image)
    proc = Processor(tok, 32, model.num_image_tokens, 128)
    assert model.num_image_tokens == tokens
    ids, labels = (torch.tensor([c]) for c in proc.conversation([("what color is the circle?", "red")]))
    assert int((ids == tok.image).sum()) == tokens
    batch_loss(model, {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32), "labels": labels}).backward()
    assert all(p.grad is not None for p in model.connector.parameters())


# --- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, patches, message", [
    (ConnectorConfig("pixel_shuffle", scale_factor=4), 36,
     "connector.scale_factor=4 does not divide the 6x6 patch grid"),
    (ConnectorConfig("pixel_shuffle", scale_factor=0), 16, "connector.scale_factor=0 must be at least 1"),
    (ConnectorConfig("pixel_shuffle"), 12, "connector.kind=pixel_shuffle needs a square patch grid"),
    (ConnectorConfig("avgpool", tokens=5), 16, "connector.tokens=5 is not a square number"),
    (ConnectorConfig("avgpool", tokens=0), 16, "connector.tokens=0 is not a square number"),
    (ConnectorConfig("avgpool", tokens=25), 16, "connector.tokens=25 needs a 5x5 grid, more than the 4x4 patch grid"),
    (ConnectorConfig("mlp", scale_factor=3), 16, "connector.scale_factor=3 is not read by connector.kind=mlp"),
    (ConnectorConfig("pixel_shuffle", tokens=4), 16,
     "connector.tokens=4 is not read by connector.kind=pixel_shuffle"),
])
def test_bad_connector_settings(cfg, patches, message):
    with pytest.raises(UserError, match=message):
        check_connector(cfg, patches)


def train(tmp_path, *sets: str) -> int:
    args = ["train", "tiny", "--out", str(tmp_path / "run"),
            "--set", "train.steps=2", "--set", "train.progress=false", "--set", "eval.splits=[]"]
    return main(args + [a for s in sets for a in ("--set", s)])


def test_scale_factor_that_divides_the_grid_trains(tmp_path):
    # 32 px / 8 px patches: a 4x4 grid, one token per image.
    assert train(tmp_path, "vision.image_size=32", "connector.kind=pixel_shuffle", "connector.scale_factor=4") == 0


@pytest.mark.parametrize("sets, message", [
    (["vision.image_size=24", "vision.patch_size=4", "connector.kind=pixel_shuffle", "connector.scale_factor=4"],
     "connector.scale_factor=4 does not divide the 6x6 patch grid"),
    (["connector.kind=avgpool", "connector.tokens=5"], "connector.tokens=5 is not a square number"),
    (["connector.scale_factor=3"], "connector.scale_factor=3 is not read by connector.kind=mlp"),
])
def test_bad_settings_are_one_line_with_exit_code_2(sets, message, tmp_path, capsys):
    assert train(tmp_path, *sets) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- the recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["shapes_pixel_shuffle", "shapes_avgpool"])
def test_recipes_give_four_image_tokens(recipe):
    from graft.build import build_model

    assert build_model(RECIPES[recipe](), tokenizer()).num_image_tokens == 4  # shapes_vqa: 9


# Measured on a 2-core CPU, one core, seed 0, these settings (about 100 s a run): pixel_shuffle
# size 0.84, colour 0.24; avgpool size 0.84, colour 0.58 (seed 1: 0.86 / 0.36 and 0.82 / 0.72).
# No text-only model beats 1/2 on size or 1/5 on colour on the test split (sizes uniform; colours
# uniform but one colour of each shape is held out for the compositional split, so "what color is
# the circle?" leaves 5); a blank-image shapes_vqa run (half width, 150 steps, seed 0, one thread,
# Intel Xeon) got size 0.54, colour 0.14. At 200 steps (~55 s)
# neither is reliable yet: pixel_shuffle sizes 0.58-0.64, colours 0.18-0.24; avgpool colour
# 0.34. A single linear map (pixel_shuffle, like `linear`) learns colour later than the MLP
# connectors (mlp 0.44-0.78 at 200 steps): 0.46 at step 400 and 0.60 at 800 of an 800-step run.
# CI runs the average-pooling recipe only, at half width with one object per image for 200 steps
# (23 s, one thread, Intel Xeon; train.seed 0-2: colour 0.74, 0.97, 0.97, size 1.00 each; full
# width, 41 s: 0.95 / 1.00); the pixel-shuffle run (size >= 0.7) is left to `graft compare`
# (docs/compare.md: 0.464 ± 0.010 VQA over 3 seeds against 0.17 by chance) to keep the suite
# within its 8 minutes.
LEARNS = {"shapes_avgpool": {"vqa_acc/size": 0.8, "vqa_acc/color": 0.6}}
HALF_WIDTH = ["vision.hidden_size=64", "vision.intermediate_size=256", "lm.hidden_size=64", "lm.intermediate_size=192"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(LEARNS))
def test_recipe_learns_from_images(recipe, tmp_path):
    run = tmp_path / "run"
    sets = ["train.steps=200", "train.batch_size=32", "train.progress=false", "train.log_every=50",
            "train.ckpt_every=200", "data.max_objects=1", "eval.vqa_per_type=50", "eval.captions=0",
            "eval.splits=[test]", *HALF_WIDTH]
    assert main(["train", recipe, "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    results = json.loads((run / "eval.json").read_text())
    for metric, least in LEARNS[recipe].items():
        assert results[metric] >= least, (metric, results)


def test_export_refuses_a_connector_llava_cannot_hold(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "shapes_avgpool", "--out", str(run), "--set", "train.steps=1", "--set", "eval.splits=",
                 "--set", "train.progress=false", *[f"--set={p}.{k}={v}" for p in ("vision", "lm")
                                                    for k, v in (("hidden_size", 32), ("layers", 1), ("intermediate_size", 64))]]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "connector.kind=avgpool" in capsys.readouterr().err and not (tmp_path / "hf").exists()
