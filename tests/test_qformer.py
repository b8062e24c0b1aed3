"""The BLIP-2 Q-Former (graft/models/qformer.py, graft/models/blip2.py): the same function as HF
`Blip2QFormerModel` with the same weights, the three stage-1 losses (maths, precision, gradients,
across processes), the stage-2 connector and its `connector.init_from` checks."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: the HF module is built from a config

import math

import pytest
import torch
import torch.nn.functional as F

from graft.data.shapes import ShapesWorld
from graft.models.blip2 import QFormerStage1, hard_negatives, itc_loss, itg_mask
from graft.models.qformer import QFormerConfig, QFormerModel, TextEmbeddings
from graft.models.vit import VisionConfig

ATOL = 1e-5  # fp32
TINY = QFormerConfig(hidden_size=32, layers=3, heads=4, intermediate_size=48, queries=5, cross_attention_frequency=2,
                     embed_dim=16, max_text_len=7)


def hf_qformer(cfg: QFormerConfig, image_dim: int, vocab: int, text: bool = True):
    """HF's Blip2QFormerModel and Blip2TextEmbeddings for `cfg`, eval mode (no dropout), eager attention."""
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import (
        Blip2QFormerModel,
        Blip2TextEmbeddings,
    )

    config = Blip2QFormerConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                                num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size,
                                cross_attention_frequency=cfg.cross_attention_frequency,
                                encoder_hidden_size=image_dim, max_position_embeddings=cfg.max_text_len + 1,
                                layer_norm_eps=cfg.layer_norm_eps, use_qformer_text_input=text)
    config._attn_implementation = "eager"  # not graft's SDPA path
    return Blip2QFormerModel(config).eval(), Blip2TextEmbeddings(config).eval()


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():  # random everywhere; norm scales near 1 but not 1
        for name, p in module.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "LayerNorm" in name or "layernorm" in name
                    else 0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours, emb = QFormerModel(TINY, image_dim=24).eval(), TextEmbeddings(TINY, 50, TINY.max_text_len + 1)
    _randomise(ours), _randomise(emb)
    hf, hf_emb = hf_qformer(TINY, 24, 50)
    assert sorted(hf.state_dict()) == sorted(ours.state_dict())  # HF's names: the key map is the identity
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf_emb.load_state_dict(emb.state_dict(), strict=True)  # position_ids is a non-persistent buffer
    return ours, emb, hf, hf_emb


def test_queries_only_match_hf(pair):
    ours, _, hf, _ = pair
    queries, image = torch.randn(3, TINY.queries, 32), torch.randn(3, 9, 24)
    with torch.no_grad():
        got = ours(queries, TINY.queries, image)
        want = hf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    assert got.shape == want.shape == (3, TINY.queries, 32)
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, diff
    print(f"queries only: max |diff| {diff:.2e}")


def _text_inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (3, TINY.max_text_len + 1))
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, 5:], real[2, 3:] = False, False  # padded texts
    return ids, real


def test_queries_and_text_match_hf_bidirectional_with_padding(pair):
    """ITM's layout: [queries; text], all attending to all real tokens (HF: query_length + a 2-D mask)."""
    ours, emb, hf, hf_emb = pair
    ids, real = _text_inputs()
    queries, image = torch.randn(3, TINY.queries, 32), torch.randn(3, 9, 24)
    mask = torch.cat([torch.ones(3, TINY.queries, dtype=torch.bool), real], 1)
    with torch.no_grad():
        got = ours(torch.cat([queries, emb(ids)], 1), TINY.queries, image, mask)
        want = hf(query_embeds=hf_emb(input_ids=ids, query_embeds=queries), query_length=TINY.queries,
                  attention_mask=mask.long(), encoder_hidden_states=image).last_hidden_state
    diff = (got - want)[mask].abs().max().item()  # pad rows are never read
    assert diff <= ATOL, diff
    print(f"queries + text: max |diff| {diff:.2e}")


def test_itg_mask_matches_hf_with_a_4d_mask(pair):
    """ITG's layout: queries among themselves, text causal and seeing the queries (HF takes a 4-D mask as is)."""
    ours, emb, hf, hf_emb = pair
    ids, real = _text_inputs()
    queries, image = torch.randn(3, TINY.queries, 32), torch.randn(3, 9, 24)
    allowed = itg_mask(TINY.queries, real)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        got = ours(torch.cat([queries, emb(ids)], 1), TINY.queries, image, allowed)
        want = hf(query_embeds=hf_emb(input_ids=ids, query_embeds=queries), query_length=TINY.queries,
                  attention_mask=additive, encoder_hidden_states=image).last_hidden_state
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, diff
    print(f"ITG mask: max |diff| {diff:.2e}")
    # and the mask means what it says: a text token does not see the tokens after it
    later = ids.clone()
    later[:, -1] = (later[:, -1] % 49) + 1
    with torch.no_grad():
        moved = ours(torch.cat([queries, emb(later)], 1), TINY.queries, image, allowed)
    assert torch.allclose(moved[:, :-1], got[:, :-1], atol=1e-6) and not torch.allclose(moved[:, -1], got[:, -1])


def test_text_only_matches_hf(pair):
    ours, emb, hf, hf_emb = pair
    ids, real = _text_inputs()
    with torch.no_grad():
        got = ours(emb(ids), 0, mask=real)
        want = hf(query_embeds=hf_emb(input_ids=ids), query_length=0, attention_mask=real.long()).last_hidden_state
    diff = (got - want)[real].abs().max().item()
    assert diff <= ATOL, diff


def test_hf_weights_load_into_graft():
    """The other direction: HF's own initialisation, loaded into graft's module, same outputs."""
    torch.manual_seed(2)
    hf, _ = hf_qformer(TINY, 24, 50, text=False)
    ours = QFormerModel(TINY, image_dim=24, text=False).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    queries, image = torch.randn(2, TINY.queries, 32), torch.randn(2, 4, 24)
    with torch.no_grad():
        diff = (ours(queries, TINY.queries, image) - hf(query_embeds=queries, encoder_hidden_states=image)
                .last_hidden_state).abs().max().item()
    assert diff <= ATOL, diff


# ---- the stage-1 losses -----------------------------------------------------------------------


def _reference_itc(x, y, scale):
    """Textbook BLIP-2 ITC, one loop per pair: s_ij = max_q x_iq·y_j; CLIP's symmetric CE."""
    n = x.shape[0]
    s = torch.stack([torch.stack([(x[i] @ y[j]).max() for j in range(n)]) for i in range(n)]) * scale
    i2t = -torch.stack([s[i].log_softmax(0)[i] for i in range(n)]).mean()
    t2i = -torch.stack([s[:, j].log_softmax(0)[j] for j in range(n)]).mean()
    return (i2t + t2i) / 2


def test_itc_matches_the_formula_keeps_fp64_and_passes_gradcheck():
    torch.manual_seed(3)
    x = F.normalize(torch.randn(5, 3, 4, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    got = itc_loss(x, y, scale)
    assert got.dtype == torch.float64
    assert torch.allclose(got, _reference_itc(x, y, scale), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, s: itc_loss(a, b, s), (x, y, scale))
    assert itc_loss(x.detach().half(), y.detach().half(), torch.tensor(7.0)).dtype == torch.float32  # never lower


def tiny_stage1(dtype=torch.float32, vocab: int = 30, pad: int = 0):
    torch.manual_seed(4)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=16, layers=1, heads=2, intermediate_size=32)
    cfg = QFormerConfig(hidden_size=16, layers=2, heads=2, intermediate_size=24, queries=3, embed_dim=8, max_text_len=6)
    return QFormerStage1(vision, cfg, vocab, pad).to(dtype)


def _batch(n: int = 4, dtype=torch.float32):
    torch.manual_seed(5)
    ids = torch.randint(1, 30, (n, 6))
    ids[0, 4:], ids[2, 3:] = 0, 0  # padding
    return {"pixel_values": torch.randn(n, 3, 16, 16, dtype=dtype), "input_ids": ids}


def test_stage1_losses_in_fp64_pass_gradcheck():
    """Each named loss, through the whole model in fp64 (queries, ITM and ITG heads, the ITC
    temperature as inputs), against finite differences. The hard negatives are a function of the
    ITC scores, but a draw does not change under the tiny perturbations gradcheck makes."""
    from torch.func import functional_call

    model, batch = tiny_stage1(torch.float64), _batch(3, torch.float64)
    names = ["qformer.query_tokens", "itm_head.weight", "lm_head.bias", "logit_scale"]
    params = dict(model.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    for loss in ("itc", "itm", "itg"):
        def f(*values, loss=loss):
            return functional_call(model, dict(zip(names, values)), (), batch)[1][loss]

        assert f(*inputs).dtype == torch.float64
        assert torch.autograd.gradcheck(f, inputs, atol=1e-6), loss


def test_losses_counts_and_gradients_everywhere():
    model, batch = tiny_stage1(), _batch()
    _, losses = model(**batch)
    counts = model.loss_counts(**batch)
    assert counts == {"itc": 4, "itm": 12, "itg": int((batch["input_ids"] != 0).sum())}
    # ITG is next-token CE on the caption tokens: at init about log(vocab) per token
    assert abs(losses["itg"].item() / counts["itg"] - math.log(30)) < 1.0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_itg_text_does_not_see_later_tokens_and_itc_text_does_not_see_the_image():
    model, batch = tiny_stage1(), _batch()
    model.eval()
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    assert torch.equal(model.encode_text(batch["input_ids"]), model.encode_text(other["input_ids"]))
    assert not torch.allclose(model.encode_image(batch["pixel_values"]), model.encode_image(other["pixel_values"]))
    emb = model.encode_image(batch["pixel_values"])  # one embedding per query
    assert emb.shape[::2] == (4, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[:2]))


def test_hard_negatives_never_draw_the_positive_or_an_identical_text():
    ids = torch.tensor([[1, 2], [1, 2], [3, 4], [5, 6]])  # texts 0 and 1 are the same caption
    sims = torch.eye(4) * 50  # the positive dominates: only the exclusion keeps a draw possible
    for shift in range(20):
        t, i = hard_negatives(sims + shift * 0.01 * torch.randn(4, 4), ids + shift * 10)
        assert all(t[k] != k and i[k] != k for k in range(4))
        assert t[0] not in (0, 1) and t[1] not in (0, 1) and i[0] not in (0, 1) and i[1] not in (0, 1)
    # a pure function of the batch: the global RNG neither matters nor moves
    state = torch.get_rng_state()
    a = hard_negatives(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), ids)
    torch.manual_seed(123)
    b = hard_negatives(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), ids)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.set_rng_state(state)
    # hard: the most similar other text is drawn most often
    sims = torch.tensor([[9.0, 8.0, 0.0, 0.0]] * 4)
    picks = [hard_negatives(sims, torch.arange(8).view(4, 2) + 10 * s)[0][0].item() for s in range(200)]
    assert picks.count(1) > 190


@pytest.mark.slow  # starts processes
def test_itc_on_two_processes_equals_one_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "qformer_itc_dist.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("itc OK") == 2, done.stdout


# ---- stage 2: connector.kind=qformer -------------------------------------------------------------


def test_connector_makes_one_token_per_query_whatever_the_patches():
    from graft.models.connectors import ConnectorConfig, build_connector
    from graft.models.qformer import QFormerConnector

    cfg = ConnectorConfig("qformer", qformer=QFormerConfig(hidden_size=32, layers=2, heads=4, intermediate_size=48,
                                                           queries=6))
    conn = build_connector(cfg, vision_dim=24, lm_dim=40)
    assert isinstance(conn, QFormerConnector) and not any("intermediate." in k for k in conn.state_dict())
    for patches in (4, 9, 36):
        assert conn(torch.randn(2, patches, 24)).shape == (2, 6, 40) and conn.num_tokens(patches) == 6


@pytest.mark.parametrize("setting, needle", [
    ("connector.qformer.layers=3", "connector.qformer.layers=3 is not read by connector.kind=mlp"),
    ("connector.init_from=/x", "connector.init_from=/x is not read by connector.kind=mlp"),
])
def test_qformer_keys_for_another_connector_are_refused(setting, needle, tmp_path, capsys):
    from graft.cli import main

    assert main(["train", "shapes_vqa", "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def _stage2_refused(tmp_path, capsys, *settings) -> str:
    from graft.cli import main

    out = tmp_path / "stage2"
    sets = [a for s in settings for a in ("--set", s)]
    assert main(["train", "shapes_qformer", "--out", str(out), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not out.exists()  # refused with the config checks, before anything is written
    return err[0]


def test_stage2_from_a_missing_dir_or_a_run_that_is_not_stage1_is_one_line(tmp_path, capsys):
    from graft import config as config_mod
    from graft.recipes import RECIPES

    missing = tmp_path / "nowhere"
    err = _stage2_refused(tmp_path, capsys, f"connector.init_from={missing}")
    assert f"connector.init_from={missing} is not a graft run directory" in err
    vlm = tmp_path / "vlm_run"  # a run directory of another design
    vlm.mkdir()
    config_mod.save(RECIPES["shapes_vqa"](), vlm / "config.yaml")
    err = _stage2_refused(tmp_path, capsys, f"connector.init_from={vlm}")
    assert f"connector.init_from={vlm} is a model=vlm run, not a Q-Former stage-1 run" in err
    stage1 = tmp_path / "stage1_run"  # a stage-1 run that never finished a checkpoint
    stage1.mkdir()
    config_mod.save(RECIPES["shapes_qformer_stage1"](), stage1 / "config.yaml")
    err = _stage2_refused(tmp_path, capsys, f"connector.init_from={stage1}")
    assert f"connector.init_from={stage1} has no complete checkpoint" in err


def test_stage1_bad_settings_are_one_line(tmp_path, capsys):
    from graft.cli import main

    for setting, needle in (("qformer.heads=5", "qformer.hidden_size=128 is not divisible by qformer.heads=5"),
                            ("train.grad_accum=64", "micro-batches of one pair"),
                            ("connector.kind=linear", "--set connector.kind: model=qformer_stage1 does not read"),
                            ("train.objectives={lm: 1}", "'lm' is not a loss of model=qformer_stage1")):
        assert main(["train", "shapes_qformer_stage1", "--out", str(tmp_path / "run"), "--set", setting]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (setting, err)
        assert not (tmp_path / "run").exists()


def test_stage1_design_entry_builds_what_it_promises():
    from graft.designs import DESIGNS, EMBEDS
    from graft.recipes import RECIPES
    from graft.build import build_model, build_processor
    from tests.helpers import tokenizer

    cfg, tok = RECIPES["shapes_qformer_stage1"](), tokenizer()
    entry, model = DESIGNS[cfg.model], build_model(cfg, tok)
    assert entry.capabilities == {EMBEDS} and set(entry.losses) == {"itc", "itm", "itg"}
    for part in entry.parts:  # what train.freeze may name freezes something
        before = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.freeze([part])
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) < before, part
    proc = build_processor(cfg, tok, model)
    batch = proc.pairs([ShapesWorld(24, 3).sample("train", i).image for i in range(2)], ["a small red circle"] * 2)
    assert batch["input_ids"].shape == (2, cfg.qformer.max_text_len)
    assert model.encode_text(batch["input_ids"]).shape == (2, 64)
    assert model.encode_image(batch["pixel_values"]).shape == (2, cfg.qformer.queries, 64)


def test_stage1_gradients_are_the_same_on_every_pass_with_two_threads():
    """On CPU threads the gradient of ITM's negative images must not depend on thread timing
    (indexing's backward adds with atomic adds in no fixed order; `index_select`'s does not): the
    same batch gives bit-identical gradients on every pass, so runs are reproducible."""
    torch.manual_seed(4)
    vision = VisionConfig(image_size=24, patch_size=8, hidden_size=128, layers=1, heads=4, intermediate_size=128)
    cfg = QFormerConfig(hidden_size=32, layers=1, heads=2, intermediate_size=32, queries=4, embed_dim=16,
                        max_text_len=6)
    model = QFormerStage1(vision, cfg, 30, 0)
    torch.manual_seed(5)
    batch = {"pixel_values": torch.randn(64, 3, 24, 24), "input_ids": torch.randint(1, 30, (64, 6))}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite's workers run one thread each (tests/conftest.py)
    try:
        def grads():
            model.zero_grad()
            sum(model(**batch)[1].values()).backward()
            return [p.grad.clone() for p in model.parameters() if p.grad is not None]

        first = grads()
        for _ in range(4):
            assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    finally:
        torch.set_num_threads(threads)
