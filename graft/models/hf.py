"""Bridges between graft models and their Hugging Face twins (written against transformers 5).

`ViT` is `SiglipVisionModel` without the pooling head and `LanguageModel` is `LlamaForCausalLM`,
so moving weights is a matter of configs and key names; tensors are never touched.

Key naming (transformers 5):
  * `SiglipVisionModel.state_dict()` has the same keys as `ViT` (`embeddings.*`, `encoder.layers.N.*`,
    `post_layernorm.*`). Checkpoints saved from `SiglipModel` or by transformers 4 nest them under
    `vision_model.`; `vit_from_hf` accepts both. `embeddings.position_ids` is a non-persistent
    buffer, absent from `state_dict()` but present in some old checkpoints.
  * `LlamaForCausalLM` puts everything except `lm_head` under `model.`; graft drops that prefix.
    With tied embeddings HF still lists `lm_head.weight`, but a saved checkpoint may omit it.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, SiglipVisionConfig

from graft.models.decoder import LMConfig
from graft.models.vit import VisionConfig

StateDict = dict[str, torch.Tensor]

_VISION_PREFIX = "vision_model."
_LM_PREFIX = "model."


def siglip_vision_config(cfg: VisionConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh",  # graft's MLP uses the tanh approximation of GELU
        vision_use_head=False,  # graft has no attention-pooling head
    )


def llama_config(cfg: LMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        # transformers 5 keeps the RoPE base inside `rope_parameters` (a bare `rope_theta` is legacy).
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )


def vit_to_hf(state_dict: StateDict) -> StateDict:
    """graft `ViT` → `SiglipVisionModel`: the names already agree."""
    return dict(state_dict)


def vit_from_hf(state_dict: StateDict) -> StateDict:
    """`SiglipVisionModel` (or a full SigLIP checkpoint) → graft `ViT`."""
    if any(k.startswith(_VISION_PREFIX) for k in state_dict):
        # Nested layout: keep only the vision tower (a SiglipModel checkpoint also has text_model.*).
        state_dict = {k[len(_VISION_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_VISION_PREFIX)}
    # position_ids is rebuilt at init and the pooling head has no counterpart in graft.
    return {k: v for k, v in state_dict.items() if k != "embeddings.position_ids" and not k.startswith("head.")}


def lm_to_hf(state_dict: StateDict) -> StateDict:
    """graft `LanguageModel` → `LlamaForCausalLM`: everything but the head moves under `model.`."""
    return {(k if k.startswith("lm_head.") else _LM_PREFIX + k): v for k, v in state_dict.items()}


def lm_from_hf(state_dict: StateDict) -> StateDict:
    """`LlamaForCausalLM` → graft `LanguageModel`."""
    out = {
        (k[len(_LM_PREFIX):] if k.startswith(_LM_PREFIX) else k): v
        for k, v in state_dict.items()
        # Old checkpoints saved the RoPE frequency table; graft recomputes it.
        if not k.endswith("rotary_emb.inv_freq")
    }
    # Tied checkpoints may omit the head; graft's state dict lists it (it is the embedding tensor).
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
