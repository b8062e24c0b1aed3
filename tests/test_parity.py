"""Numerical parity between graft's models and their Hugging Face twins, and KV-cache consistency.

Every model gets random weights, norm scales and biases included, so a test can only pass when
the two implementations compute the same function (RoPE convention, GQA head grouping, norm
placement, activation, ...). HF models use eager attention so they do not share graft's SDPA path.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: every model here is built from a config

import pytest
import torch
from transformers import LlamaForCausalLM, SiglipVisionModel

from graft.models import decoder
from graft.models.decoder import KVCache, LanguageModel, LMConfig
from graft.models.hf import llama_config, lm_from_hf, lm_to_hf, siglip_vision_config, vit_from_hf, vit_to_hf
from graft.models.vit import ViT, VisionConfig

ATOL = 1e-5  # fp32

VIT_CFG = VisionConfig(image_size=32, patch_size=8, hidden_size=64, layers=3, heads=4, intermediate_size=128)


def lm_cfg(tie: bool) -> LMConfig:
    # A non-default rope_theta checks that the base reaches HF's config.
    return LMConfig(
        vocab_size=97, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128,
        rope_theta=1000.0, tie_embeddings=tie, max_seq_len=64,
    )


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere; norm scales near 1 (not at 1) and biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = "norm" in name and name.endswith(".weight")
            p.copy_(1 + 0.3 * noise if is_norm_scale else 0.1 * noise)
    return model.eval()


def eager(config):
    config._attn_implementation = "eager"
    return config


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- vision ----------------------------------------------------------------------------------


def test_vit_matches_siglip():
    graft = randomize(ViT(VIT_CFG), seed=1)
    hf = SiglipVisionModel(eager(siglip_vision_config(VIT_CFG))).eval()
    hf.load_state_dict(vit_to_hf(graft.state_dict()), strict=True)  # position_ids is non-persistent

    x = torch.randn(2, 3, VIT_CFG.image_size, VIT_CFG.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        assert max_diff(graft(x), out.last_hidden_state) <= ATOL

        hidden = out.hidden_states  # embeddings, then the output of each encoder layer
        assert len(hidden) == VIT_CFG.layers + 1
        assert max_diff(graft.embeddings(x), hidden[0]) <= ATOL
        # The last entry is taken before post_layernorm, as graft's features(layer=-1) is.
        assert max_diff(graft.features(x, layer=-1), hidden[-1]) <= ATOL
        assert max_diff(hidden[-1], out.last_hidden_state) > 1e-2  # ...and that norm really differs
        for k in range(1, VIT_CFG.layers):  # intermediate layers: hidden_states[k] = layer k-1
            assert max_diff(graft.features(x, layer=k - 1), hidden[k]) <= ATOL


def test_vit_from_siglip():
    hf = randomize(SiglipVisionModel(eager(siglip_vision_config(VIT_CFG))), seed=3)
    graft = ViT(VIT_CFG).eval()
    graft.load_state_dict(vit_from_hf(hf.state_dict()), strict=True)

    x = torch.randn(2, 3, VIT_CFG.image_size, VIT_CFG.image_size)
    with torch.no_grad():
        assert max_diff(graft(x), hf(pixel_values=x).last_hidden_state) <= ATOL


def test_vit_from_hf_accepts_nested_checkpoints():
    """SiglipModel / transformers-4 checkpoints prefix the tower with `vision_model.`."""
    flat = ViT(VIT_CFG).state_dict()
    nested = {"vision_model." + k: v for k, v in flat.items()}
    nested["vision_model.embeddings.position_ids"] = torch.arange(VIT_CFG.num_patches)[None]
    nested["text_model.embeddings.token_embedding.weight"] = torch.zeros(1)
    mapped = vit_from_hf(nested)
    assert mapped.keys() == flat.keys()
    assert all(mapped[k] is flat[k] for k in flat)  # renamed, not copied


# --- language model --------------------------------------------------------------------------


def lm_logits_close(graft: LanguageModel, hf: LlamaForCausalLM, seed: int = 4) -> float:
    ids = torch.randint(0, graft.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return max_diff(graft(ids), hf(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lm_matches_llama(tie):
    cfg = lm_cfg(tie)
    graft = randomize(LanguageModel(cfg), seed=5)
    hf = LlamaForCausalLM(eager(llama_config(cfg))).eval()
    hf.load_state_dict(lm_to_hf(graft.state_dict()), strict=True)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    assert lm_logits_close(graft, hf) <= ATOL


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lm_from_llama(tie):
    cfg = lm_cfg(tie)
    hf = randomize(LlamaForCausalLM(eager(llama_config(cfg))), seed=6)
    graft = LanguageModel(cfg).eval()
    graft.load_state_dict(lm_from_hf(hf.state_dict()), strict=True)
    assert lm_logits_close(graft, hf) <= ATOL

    if tie:  # a saved tied checkpoint may leave out lm_head.weight
        sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        graft = LanguageModel(cfg).eval()
        graft.load_state_dict(lm_from_hf(sd), strict=True)
        assert lm_logits_close(graft, hf) <= ATOL


def test_lm_parity_detects_wrong_rope_convention(monkeypatch):
    """Negative control: interleaved (GPT-J) RoPE is a valid rotation but not Llama's, so it must fail."""
    cfg = lm_cfg(tie=False)
    graft = randomize(LanguageModel(cfg), seed=7)
    hf = LlamaForCausalLM(eager(llama_config(cfg))).eval()
    hf.load_state_dict(lm_to_hf(graft.state_dict()), strict=True)
    assert lm_logits_close(graft, hf) <= ATOL

    half_split_tables = decoder.rope_tables

    def interleaved_tables(positions, head_dim, theta, dtype):
        cos, sin = half_split_tables(positions, head_dim, theta, dtype)
        return (t[..., : head_dim // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))

    def rotate_pairs(x):
        even, odd = x[..., ::2], x[..., 1::2]
        return torch.stack((-odd, even), dim=-1).flatten(-2)

    monkeypatch.setattr(decoder, "rope_tables", interleaved_tables)
    monkeypatch.setattr(decoder, "_rotate_half", rotate_pairs)
    assert lm_logits_close(graft, hf) > 1e-3


# --- KV cache --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_and_ids():
    torch.manual_seed(0)
    model = randomize(LanguageModel(lm_cfg(tie=False)), seed=8)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids)
    return model, ids, full


@torch.no_grad()
def test_kv_cache_token_by_token(lm_and_ids):
    model, ids, full = lm_and_ids
    cache, prefill = KVCache(), 12
    assert max_diff(model(ids[:, :prefill], cache=cache), full[:, :prefill]) <= ATOL
    for t in range(prefill, ids.shape[1]):
        step = model(ids[:, t : t + 1], cache=cache)
        assert max_diff(step, full[:, t : t + 1]) <= ATOL
    assert cache.seen() == ids.shape[1]


@torch.no_grad()
def test_kv_cache_chunks(lm_and_ids):
    model, ids, full = lm_and_ids
    cache = KVCache()
    # Prefill, a multi-token chunk (causal inside, full view of the past), then another chunk.
    for start, stop in [(0, 8), (8, 15), (15, 20)]:
        out = model(ids[:, start:stop], cache=cache)
        assert max_diff(out, full[:, start:stop]) <= ATOL
    assert cache.seen() == ids.shape[1]
