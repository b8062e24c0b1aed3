"""Measured training FLOPs (trainer/flops.py): torch's FlopCounterMode on the real forward and
backward, once per batch shape, cross-checked against the hand formulas."""

import pytest
import torch

from graft.data.world_source import make_world
from graft.data.tokenizer import ChatTokenizer, world_corpus
from graft.recipes import clip, tiny
from graft.build import build_model, build_processor
from graft.trainer.flops import MeasuredFlops, count_step, dual_step_flops, vlm_step_flops
from tests.helpers import world_batches


def setup(recipe):
    cfg = recipe()
    cfg.data.pack = False
    torch.manual_seed(0)
    tok = ChatTokenizer.train(world_corpus(make_world(cfg)), cfg.data.vocab_size)
    model = build_model(cfg, tok)
    return cfg, tok, model, build_processor(cfg, tok, model)


def test_vlm_count_agrees_with_the_hand_formula_and_leaves_no_gradient():
    cfg, tok, model, proc = setup(tiny)
    batch = world_batches(cfg, proc).batch(0, 0)
    measured = count_step(model, batch)
    ids = batch["input_ids"]  # the counter sees every position of the padded rows, attending to all
    hand = vlm_step_flops(model, batch["pixel_values"].shape[0], ids.numel(), ids.shape[0] * ids.shape[1] ** 2)
    assert measured == pytest.approx(hand, rel=0.05)  # measured 1.035x here, 1.016x for shapes_vqa
    assert all(p.grad is None for p in model.parameters())
    # Frozen parts cost less. The hand formula then under-counts: it assumes no gradient reaches the
    # LM's input once vision and connector are frozen, but the LM's (tied) token embedding trains,
    # so the LM's backward still computes input gradients; the counter sees them.
    model.freeze(["vision", "connector"])
    frozen = count_step(model, batch)
    hand_frozen = vlm_step_flops(model, batch["pixel_values"].shape[0], ids.numel(), ids.shape[0] * ids.shape[1] ** 2)
    assert hand_frozen < frozen < measured


def test_dual_encoder_count_agrees_with_the_hand_formula():
    cfg, tok, model, proc = setup(clip)
    cfg.train.batch_size = 32
    batch = world_batches(cfg, proc).batch(0, 0)
    assert count_step(model, batch) == pytest.approx(dual_step_flops(model, 32), rel=0.02)  # measured 0.996x


def test_counted_once_per_shape():
    cfg, tok, model, proc = setup(tiny)
    stream, counter = world_batches(cfg, proc), MeasuredFlops()
    a, b = stream.batch(0, 0), stream.batch(1, 0)
    first = counter(model, a)
    assert counter(model, {k: v.clone() for k, v in a.items()}) == first and len(counter.cache) == 1
    counter(model, b)
    assert len(counter.cache) == (1 if a["input_ids"].shape == b["input_ids"].shape else 2)
    model.freeze(["vision"])  # another trainable set is another count
    assert counter(model, a) < first
