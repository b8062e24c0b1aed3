"""Image–text matching with hard negatives for dual encoders (models/itm.py, `contrastive.itm_layers`):
the loss is the cross-entropy over the positives and their two hard negatives, padding is masked,
a short run learns to tell an image's caption from another, bad settings are one line."""

import pytest
import torch
import torch.nn.functional as F

from graft.build import build_model, processor_for
from graft.data.world_source import make_world
from graft.models.blip2 import hard_negatives
from graft.recipes import recipe
from tests.helpers import assert_refused

SMALL = ["vision.hidden_size=32", "vision.intermediate_size=64", "vision.layers=1", "text.hidden_size=32",
         "text.intermediate_size=64", "text.layers=1", "contrastive.itm_layers=1"]


def small(n=6):
    torch.manual_seed(0)
    cfg = recipe("clip", SMALL)
    proc = processor_for(cfg)
    model = build_model(cfg, proc.tok).eval()
    samples = [make_world(cfg).sample("train", i) for i in range(n)]
    return model, proc, proc.pairs([s.image for s in samples], [s.caption for s in samples])


def test_itm_is_the_cross_entropy_of_positives_and_their_hard_negatives():
    model, _, batch = small()
    px, ids = batch["pixel_values"], batch["input_ids"]
    _, losses = model(**batch)
    patches, states = model.vision(px), model.text.states(ids)
    image_emb = F.normalize(model.image_proj(model.image_pool(patches)), dim=-1)
    text_emb = F.normalize(model.text_proj(model.text.pool(states, ids)), dim=-1)
    sims = model.logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.T
    neg_text, neg_image = hard_negatives(sims, ids)
    assert not (neg_text == torch.arange(6)).any() and not (neg_image == torch.arange(6)).any()
    expected = 0.0
    for i in range(6):
        for img, txt, label in ((i, i, 1), (i, int(neg_text[i]), 0), (int(neg_image[i]), i, 0)):
            logits = model.itm.logits(patches[img : img + 1], states[txt : txt + 1], ids[txt : txt + 1])
            expected += F.cross_entropy(logits, torch.tensor([label])).item()
    assert losses["itm"].item() == pytest.approx(expected, rel=1e-5)
    assert model.loss_counts(**batch) == {"itc": 6, "itm": 18}


def test_padding_is_masked():
    """More padding after a caption does not change its match logits."""
    model, proc, batch = small(2)
    ids = batch["input_ids"]
    longer = torch.cat([ids, torch.full((2, 3), proc.tok.pad)], 1)
    model.text.position_embedding = torch.nn.Embedding.from_pretrained(  # room for the longer rows
        torch.cat([model.text.position_embedding.weight, torch.zeros(3, 32)]), freeze=False)
    with torch.no_grad():
        patches = model.vision(batch["pixel_values"])
        short = model.itm.logits(patches, model.text.states(ids), ids)
        padded = model.itm.logits(patches, model.text.states(longer), longer)
    torch.testing.assert_close(padded, short)


def test_bad_settings_are_one_line(tmp_path, capsys):
    cases = [("clippo", ["contrastive.itm_layers=1"], "CLIPPO (contrastive.shared_tower=true) has none"),
             ("coca", ["contrastive.itm_layers=1"], "contrastive.itm_layers: model=coca does not train it"),
             ("clip", ["contrastive.itm_layers=-1"], ".itm_layers non-negative"),
             ("sensors_clip", ["contrastive.itm_layers=1"], "image–text matching reads image patches"),
             ("shapes_vqa", ["contrastive.itm_layers=1"], "does not read the 'contrastive' section")]
    assert_refused(tmp_path, capsys, cases)
