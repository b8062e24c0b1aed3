"""Masked image modelling with pixel targets for a dual encoder's ViT (models/mim.py,
`contrastive.mim_prob`): the mask, the patch targets, a masked patch unseen by the tower, the L1
loss, a run that learns to fill in patches from the visible ones, bad settings in one line."""

import pytest
import torch
import torch.nn.functional as F

from graft.build import build_model, processor_for
from graft.data.world_source import make_world
from graft.recipes import recipe
from tests.helpers import assert_refused

SMALL = ["vision.hidden_size=32", "vision.intermediate_size=64", "vision.layers=1", "text.hidden_size=32",
         "text.intermediate_size=64", "text.layers=1", "contrastive.mim_prob=0.5"]


def small(n=8):
    torch.manual_seed(0)
    cfg = recipe("siglip", SMALL)
    proc = processor_for(cfg)
    world = make_world(cfg)
    pixels = torch.stack([proc.pixels(world.sample("train", i).image) for i in range(n)])
    return build_model(cfg, proc.tok).eval(), proc, world, pixels


def test_mask_rate_at_least_one_per_image_and_a_function_of_the_batch():
    model, _, _, pixels = small(256)
    masked = model.mim.mask(pixels)
    assert masked.shape == (256, 9) and masked.any(1).all()
    assert masked.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(model.mim.mask(pixels.clone()), masked)


def test_patch_targets_are_the_vits_patches_in_order():
    model, _, _, pixels = small(2)
    patches = model.mim.patches(pixels)  # (2, 9, 3·8·8)
    assert patches.shape == (2, 9, 192)
    torch.testing.assert_close(patches[1, 5].view(3, 8, 8), pixels[1, :, 8:16, 16:24])  # row 1, column 2
    conv = model.vision.embeddings.patch_embedding  # the ViT's own patch embedding sees the same patch
    torch.testing.assert_close(F.linear(patches[1, 5], conv.weight.flatten(1), conv.bias),
                               conv(pixels[1:2]).flatten(2)[0, :, 5], rtol=1e-5, atol=1e-5)


def test_a_masked_patch_is_not_seen_and_the_loss_is_l1_there():
    model, _, _, pixels = small(4)
    where = torch.zeros(4, 9, dtype=torch.bool)
    where[:, 4] = True
    other = pixels.clone()
    other[:, :, 8:16, 8:16] = 1.0  # the middle patch changed
    with torch.no_grad():
        a = model.vision.features(pixels, -1, (where, model.mim.mask_embedding))
        b = model.vision.features(other, -1, (where, model.mim.mask_embedding))
    torch.testing.assert_close(a, b)
    masked = model.mim.mask(pixels)
    states = model.vision.post_layernorm(model.vision.features(pixels, -1, (masked, model.mim.mask_embedding)))
    expected = sum((model.mim.head(states[i, k]) - model.mim.patches(pixels)[i, k]).abs().mean().item()
                   for i, k in masked.nonzero().tolist())
    assert model.mim.loss(model.vision, pixels).item() == pytest.approx(expected, rel=1e-5)
    _, losses = model(pixel_values=pixels, input_ids=torch.zeros(4, 20, dtype=torch.long))
    assert losses["mim"].item() == pytest.approx(expected, rel=1e-5)


def test_bad_settings_are_one_line(tmp_path, capsys):
    assert_refused(tmp_path, capsys, [
        ("siglip", ["contrastive.mim_prob=1.0"], "must be in [0, 1)"),
        ("coca", ["contrastive.mim_prob=0.5"], "contrastive.mim_prob: model=coca does not train it"),
        ("sensors_clip", ["contrastive.mim_prob=0.5"], "masked image modelling masks image patches")])
