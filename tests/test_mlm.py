"""Masked language modelling of a dual encoder's text tower (models/mlm.py, `contrastive.mlm_prob`):
BERT's choice of tokens and 80/10/10 corruption, the loss at the chosen tokens, a run that learns
the captions' language far past a unigram model, bad settings in one line."""


import pytest
import torch
import torch.nn.functional as F

from graft.build import build_model, processor_for
from graft.data.world_source import make_world
from graft.recipes import recipe
from tests.helpers import assert_refused

SMALL = ["vision.hidden_size=32", "vision.intermediate_size=64", "vision.layers=1", "text.hidden_size=32",
         "text.intermediate_size=64", "text.layers=1", "contrastive.mlm_prob=0.15"]


def small():
    torch.manual_seed(0)
    cfg = recipe("siglip", SMALL)
    proc = processor_for(cfg)
    return build_model(cfg, proc.tok).eval(), proc, make_world(cfg)


def captions(proc, world, split, n):
    return torch.tensor([proc.text_ids(world.sample(split, i).caption) for i in range(n)])


def test_bert_corruption_of_real_tokens_only():
    model, proc, world = small()
    ids = captions(proc, world, "train", 2000)
    chosen, masked, corrupted = model.mlm.corrupt(ids)
    real = ~torch.isin(ids, torch.tensor([proc.tok.pad, proc.tok.bos, proc.tok.eos]))
    assert not (chosen & ~real).any()
    assert chosen.sum() / real.sum() == pytest.approx(0.15, abs=0.01)
    swapped = chosen & ~masked & (corrupted != ids)
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.02)
    assert (chosen & ~masked).sum() / chosen.sum() == pytest.approx(0.2, abs=0.02)  # 10 % random, 10 % kept
    assert swapped.sum() / chosen.sum() == pytest.approx(0.1, abs=0.02)  # a random token may equal the original
    assert torch.equal(corrupted[~chosen], ids[~chosen]) and not (masked & ~chosen).any()
    again = model.mlm.corrupt(ids.clone())
    assert all(torch.equal(a, b) for a, b in zip(again, (chosen, masked, corrupted)))  # a function of the batch


def test_mlm_is_the_cross_entropy_at_the_chosen_tokens():
    model, proc, world = small()
    ids = captions(proc, world, "train", 8)
    pixels = torch.stack([proc.pixels(world.sample("train", i).image) for i in range(8)])
    _, losses = model(pixel_values=pixels, input_ids=ids)
    chosen, masked, corrupted = model.mlm.corrupt(ids)
    states = model.text.states(corrupted, (masked, model.mlm.mask_embedding))
    expected = sum(F.cross_entropy(model.mlm.head(states[b, t])[None], ids[b, t][None]).item()
                   for b, t in chosen.nonzero().tolist())
    assert losses["mlm"].item() == pytest.approx(expected, rel=1e-5)
    assert model.loss_counts(pixel_values=pixels, input_ids=ids)["mlm"] == int(chosen.sum())
    masked_only = model.text.states(ids, (masked, model.mlm.mask_embedding))
    assert not torch.allclose(masked_only, model.text.states(ids))  # the [MASK] vector reaches the tower


def test_mlm_through_the_fusion_encoder_reads_the_image():
    """contrastive.mlm_on=fusion (ALBEF, BLIP): the corrupted caption's states go through the ITM
    fusion layers, which attend to the image, before the head — the loss is that cross-entropy, and
    another image changes it (through the text tower alone it cannot)."""
    torch.manual_seed(0)
    cfg = recipe("siglip", [*SMALL, "contrastive.itm_layers=1", "contrastive.mlm_on=fusion"])
    proc = processor_for(cfg)
    model, world = build_model(cfg, proc.tok).eval(), make_world(cfg)
    ids = captions(proc, world, "train", 8)
    pixels = torch.stack([proc.pixels(world.sample("train", i).image) for i in range(8)])
    with torch.no_grad():
        _, losses = model(pixel_values=pixels, input_ids=ids)
        chosen, masked, corrupted = model.mlm.corrupt(ids)
        fused = model.itm.fuse(model.vision(pixels), model.text.states(corrupted, (masked, model.mlm.mask_embedding)),
                               corrupted)
        expected = sum(F.cross_entropy(model.mlm.head(fused[b, t])[None], ids[b, t][None]).item()
                       for b, t in chosen.nonzero().tolist())
        assert losses["mlm"].item() == pytest.approx(expected, rel=1e-5)
        _, other = model(pixel_values=pixels.flip(0), input_ids=ids)  # each caption with another image
    assert abs(other["mlm"].item() - losses["mlm"].item()) > 1e-4
    text_only, _, _ = small()
    with torch.no_grad():
        a = text_only(pixel_values=pixels, input_ids=ids)[1]["mlm"].item()
        b = text_only(pixel_values=pixels.flip(0), input_ids=ids)[1]["mlm"].item()
    assert a == b


def test_bad_settings_are_one_line(tmp_path, capsys):
    cases = [("clip", ["contrastive.mlm_prob=0.15"], "needs a bidirectional text tower"),
             ("siglip", ["contrastive.mlm_prob=0.15", "contrastive.mlm_on=fusion"], "contrastive.itm_layers > 0"),
             ("siglip", ["contrastive.mlm_on=image"], "contrastive.mlm_on='image' is not one of text, fusion"),
             ("siglip", ["contrastive.mlm_prob=1.0"], "must be in [0, 1)"),
             ("clippo", ["contrastive.mlm_prob=0.15", "text.causal=false"], "CLIPPO (contrastive.shared_tower=true) has none"),
             ("coca", ["contrastive.mlm_prob=0.15"], "contrastive.mlm_prob: model=coca does not train it")]
    assert_refused(tmp_path, capsys, cases)
