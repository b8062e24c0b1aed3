"""Retrieval re-ranked by image–text matching (`eval.itm_rerank`, graft/eval/retrieval.py; BLIP): each
query's contrastive top K re-ordered by the model's match probability, checked against the order
computed pair by pair; the metrics a run reports; settings that cannot re-rank refused in one line."""

import copy
import json

import pytest
import torch

from graft.build import assemble, build_processor, tokenizer_for
from graft.data.contrastive import pair_text
from graft.data.world_source import make_world
from graft.eval.retrieval import reranked
from graft.eval.zero_shot import embed_images, embed_texts
from graft.recipes import recipe
from tests.helpers import cli, one_line_error

SMALL = ["vision.hidden_size=32", "vision.layers=1", "vision.intermediate_size=64", "text.hidden_size=32",
         "text.layers=1", "text.intermediate_size=64", "contrastive.embed_dim=16"]


class Float64:
    """`model.match` computed in float64."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).double()

    def match(self, pixel_values, input_ids):
        return self.model.match(pixel_values.double(), input_ids)


@pytest.mark.parametrize("name, sets", [("siglip", [*SMALL, "contrastive.itm_layers=1"]),
                                        ("shapes_qformer_stage1", ["qformer.layers=1", "qformer.hidden_size=32",
                                                            "qformer.intermediate_size=64"])])
def test_each_querys_top_k_is_reordered_by_the_match_probability(name, sets):
    cfg = recipe(name, sets)
    tok = tokenizer_for(cfg)
    torch.manual_seed(0)
    model = assemble(cfg, tok).eval()
    proc = build_processor(cfg, tok, model)
    samples = [make_world(cfg).sample("test", i) for i in range(10)]
    images, texts = [s.image for s in samples], [pair_text(s) for s in samples]
    k = 4
    exact = Float64(model)  # an untrained model's match scores nearly tie: in fp64 the batch's sums cannot reorder them
    with torch.no_grad():
        sims = model.similarity(embed_images(model, proc, images, 4), embed_texts(model, proc, texts, 4))
        for flipped in (False, True):
            scores = sims.T if flipped else sims
            ranked = reranked(exact, proc, images, texts, scores, k, batch_size=3, texts_ask=flipped)
            for q in range(10):
                top = scores[q].topk(k).indices.tolist()

                def match(c):
                    image, text = (c, q) if flipped else (q, c)
                    batch = proc.pairs([images[image]], [texts[text]])
                    return exact.match(batch["pixel_values"], batch["input_ids"]).item()

                order = ranked[q].argsort(descending=True).tolist()
                rest = [c for c in scores[q].argsort(descending=True).tolist() if c not in top]
                assert sorted(order[:k]) == sorted(top) and order[k:] == rest, (name, flipped, q)
                said = [match(c) for c in order[:k]]  # by match probability, highest first
                assert all(a >= b - 1e-12 for a, b in zip(said, said[1:])), (name, flipped, q, said)
                assert len(set(said)) == k  # no ties left to order arbitrarily


@pytest.mark.parametrize("name, sets", [("siglip", [*SMALL, "contrastive.itm_layers=1"]),
                                        ("shapes_qformer_stage1", ["qformer.layers=1"])])
def test_a_run_reports_recall_before_and_after_reranking(tmp_path, capsys, name, sets):
    args = [*sets, "train.steps=2", "train.batch_size=8", "eval.splits=[test]", "eval.zeroshot_images=0",
            "eval.retrieval_pairs=30", "eval.itm_rerank=5", "train.progress=false", "eval.captions=0"]
    code, _, err = cli(capsys, "train", name, "--out", tmp_path / "run", *(a for s in args for a in ("--set", s)))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    for way in ("i2t", "t2i"):
        assert 0 <= metrics[f"{way}_r@1"] <= metrics[f"{way}_r@5"] <= 1
        assert 0 <= metrics[f"{way}_itm_r@1"] <= metrics[f"{way}_itm_r@5"] <= 1
        # the top 5 are re-ordered among themselves: recall at 5 cannot change
        assert metrics[f"{way}_itm_r@5"] == metrics[f"{way}_r@5"]


@pytest.mark.parametrize("name, sets, needle", [
    ("clip", [], "this dual encoder has none (contrastive.itm_layers=0)"),
    ("coca", [], "model=coca has no image–text matching"),
    ("tiny", [], "model=vlm does not retrieve"),
    ("siglip", ["contrastive.itm_layers=1", "eval.itm_rerank=-1"], "eval.itm_rerank=-1 must not be negative"),
])
def test_a_model_that_cannot_rerank_is_refused_in_one_line(tmp_path, capsys, name, sets, needle):
    args = ["eval.itm_rerank=5", *sets]
    one_line_error(cli(capsys, "train", name, "--out", tmp_path / "run", *(a for s in args for a in ("--set", s))), needle)
    assert not (tmp_path / "run").exists()
