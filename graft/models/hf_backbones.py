"""Hugging Face backbones used in place of graft's own: any local causal LM, a SigLIP or CLIP tower.

`HFLanguageModel` wraps an `AutoModelForCausalLM` (Llama, Qwen2, GPT-2, ...) behind the interface
the VLM uses from graft's `LanguageModel`: `embed_tokens`, `forward(input_ids | inputs_embeds,
cache) -> logits`, `new_cache()`, `hidden_size`, plus `layers` / `lm_head` for the FLOP count.
`HFVisionTower` wraps a `SiglipVisionModel` or `CLIPVisionModel` behind `ViT`'s interface:
`features(pixels, layer)`, `embed_dim`, `num_patches`, `cfg`, `embeddings`, `encoder`.

Folders are local (`save_pretrained` layout); nothing is downloaded. `resolve_config` reads a
folder's architecture into graft's config fields so that config.yaml states what was trained.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from graft.errors import UserError
from graft.models.decoder import LanguageModel, LMConfig
from graft.models.vit import VisionConfig, VisionTower

VISION_TYPES = ("siglip_vision_model", "siglip", "clip_vision_model", "clip")


def _folder(key: str, path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}={path}: not a Hugging Face model folder (no config.json)")
    return folder


def _auto_config(key: str, path: str):
    # lazy: transformers takes ~0.5 s to import
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_folder(key, path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{key}={path}: cannot read its config.json ({str(e).splitlines()[0][:100]})") from None


# ---- the language model ------------------------------------------------------------------------


class HFLanguageModel(nn.Module):
    """A causal LM from a local folder, driven through `inputs_embeds` (image tokens are spliced in)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a transformers PreTrainedModel with an LM head

    @classmethod
    def load(cls, cfg: LMConfig, pretrained: bool = True) -> HFLanguageModel:
        """The folder's weights (or, with pretrained=False, its architecture only), with
        embeddings resized to cfg.vocab_size (the tokenizer gained an <image> token)."""
        # lazy: transformers takes ~0.5 s to import
        from transformers import AutoModelForCausalLM

        hf_cfg = _auto_config("lm.hf_path", cfg.hf_path)
        try:
            if pretrained:
                model = AutoModelForCausalLM.from_pretrained(cfg.hf_path, dtype=torch.float32, local_files_only=True)
            else:
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        except ValueError as e:  # e.g. a config that is not a causal LM
            raise UserError(f"lm.hf_path={cfg.hf_path}: not a causal LM folder ({str(e).splitlines()[0][:100]})") from None
        if cfg.vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
        return cls(model)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (`model.layers` for Llama/Qwen2, `transformer.h` for GPT-2)."""
        n = self.model.config.num_hidden_layers
        decoder = self.model.get_decoder()
        for child in decoder.children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return child
        raise TypeError(f"cannot find the {n} decoder blocks of {type(decoder).__name__}")

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def new_cache(self):
        # lazy: transformers takes ~0.5 s to import
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    aux_losses: tuple[str, ...] = ()

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, layout=None, aux=None) -> torch.Tensor:
        """Logits (B, T, vocab). Right padding needs no mask: causal attention never looks right.
        The rows' `Layout` has no use here: an HF decoder treats image tokens as text (config checks
        refuse `lm.image_attention` / `lm.image_positions` with lm.hf_path) and reads unpacked rows
        (packing needs the built-in decoder)."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=cache,
                         use_cache=cache is not None)
        return out.logits


def resolve_lm(cfg: LMConfig, vocab_size: int) -> LMConfig:
    """A copy of cfg whose architecture fields are the folder's (vocab: max of tokenizer and model)."""
    c = _auto_config("lm.hf_path", cfg.hf_path)
    heads = c.num_attention_heads
    embed_rows = getattr(c, "vocab_size", 0) or 0
    return replace(
        cfg,
        vocab_size=max(vocab_size, embed_rows),
        hidden_size=c.hidden_size,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        intermediate_size=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_theta=float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", cfg.rope_theta))),
        rms_norm_eps=float(getattr(c, "rms_norm_eps", cfg.rms_norm_eps)),
        max_seq_len=min(cfg.max_seq_len, getattr(c, "max_position_embeddings", cfg.max_seq_len) or cfg.max_seq_len),
    )


def load_into_builtin(cfg: LMConfig, pretrained: bool = True) -> nn.Module:
    """graft's own decoder with a Llama folder's architecture and (`pretrained`) weights: the same
    function as `LlamaForCausalLM` (models/hf.py), so built-in options apply to a pretrained LM.
    `cfg` is resolved (`resolve_lm`); rows of a larger tokenizer than the folder's embedding start
    at graft's initialisation."""
    # lazy: imports transformers (~0.5 s)
    from graft.models.hf import lm_from_hf

    c = _auto_config("lm.hf_path", cfg.hf_path)
    if c.model_type != "llama":
        raise UserError(f"lm.builtin=true loads Llama folders into graft's decoder; {cfg.hf_path} is {c.model_type!r} "
                        "(use it as an HF module: lm.builtin=false)")
    lm = LanguageModel(cfg)
    if pretrained:
        # lazy: transformers takes ~0.5 s to import
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(cfg.hf_path, dtype=torch.float32, local_files_only=True)
        weights = lm_from_hf(hf.state_dict())
        own = lm.state_dict()
        unexpected = [k for k in weights if k not in own]
        missing = [k for k in own if k not in weights and "_image." not in k]
        if unexpected or missing:  # e.g. MoE layers in place of the folder's FFNs: no upcycling yet
            raise UserError(f"lm.hf_path={cfg.hf_path} does not fit graft's decoder as configured "
                            f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
        with torch.no_grad():
            for name, value in weights.items():
                own[name][: value.shape[0]].copy_(value)  # embedding rows: the folder's first
        lm.copy_to_image_modules()
    return lm


# ---- the vision tower --------------------------------------------------------------------------


class HFVisionTower(VisionTower):
    """SigLIP or CLIP vision tower; `features` returns one encoder layer's patch tokens (no CLS)."""

    def __init__(self, model: nn.Module, cfg: VisionConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.has_cls = model.config.model_type.startswith("clip")  # CLIP prepends a class token
        head = getattr(model, "head", None)  # SigLIP's attention-pooling head: unused by a VLM
        if head is not None:
            head.requires_grad_(False)

    @classmethod
    def load(cls, cfg: VisionConfig, pretrained: bool = True) -> HFVisionTower:
        # lazy: transformers takes ~0.5 s to import
        from transformers import CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

        hf_cfg = _vision_config(cfg.hf_path)
        model_cls = SiglipVisionModel if isinstance(hf_cfg, SiglipVisionConfig) else CLIPVisionModel
        if pretrained:
            model = model_cls.from_pretrained(cfg.hf_path, config=hf_cfg, dtype=torch.float32, local_files_only=True)
        else:
            model = model_cls(hf_cfg)
        return cls(model, cfg)

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def post_layernorm(self) -> nn.Module:
        return self.model.post_layernorm

    def features(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(B, P, D): output of encoder layer `layer` (ViT.features' convention), CLS dropped."""
        layer = self.cfg.feature_layer if layer is None else layer
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        x = out.hidden_states[layer % self.cfg.layers + 1]  # hidden_states[0] is the embedding output
        return x[:, 1:] if self.has_cls else x


def _vision_config(path: str):
    # lazy: transformers takes ~0.5 s to import
    from transformers import CLIPConfig, SiglipConfig

    c = _auto_config("vision.hf_path", path)
    if isinstance(c, (SiglipConfig, CLIPConfig)):  # a full two-tower folder: use its vision half
        c = c.vision_config
    if c.model_type not in VISION_TYPES:
        raise UserError(f"vision.hf_path={path}: model type '{c.model_type}' is not a SigLIP or CLIP vision tower")
    return c


def resolve_vision(cfg: VisionConfig) -> VisionConfig:
    """A copy of cfg with the folder's architecture and, if present, its preprocessor mean/std."""
    c = _vision_config(cfg.hf_path)
    out = replace(cfg, image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
                  layers=c.num_hidden_layers, heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                  layer_norm_eps=c.layer_norm_eps)
    pre = Path(cfg.hf_path) / "preprocessor_config.json"
    if pre.is_file():
        try:
            data = json.loads(pre.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{pre} is not valid JSON") from None
        out.image_mean = [float(v) for v in data.get("image_mean", out.image_mean)]
        out.image_std = [float(v) for v in data.get("image_std", out.image_std)]
    return out
