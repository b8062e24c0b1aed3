"""graft's VLM ↔ `transformers.LlavaForConditionalGeneration` (config, weight names, both directions).

A graft VLM *is* a LLaVA model: vision tower → `LlavaMultiModalProjector` (linear_1, act,
linear_2) → image features scattered into the `<image>` placeholders of the LM input. Names
(transformers 5):

    graft                          LLaVA
    vision.<k>  (built-in ViT)     model.vision_tower.<k>            (SiglipVisionModel keys)
    vision.model.<k>  (HF tower)   model.vision_tower.<k>            (SiglipVisionModel / CLIPVisionModel)
    connector.linear_{1,2}.<k>     model.multi_modal_projector.linear_{1,2}.<k>
    lm.lm_head.weight              lm_head.weight
    lm.<k>  (built-in decoder)     model.language_model.<k>          (LlamaModel keys)
    lm.model.<base>.<k>  (HF LM)   model.language_model.<k>          (<base> = "model", "transformer", ...)

A linear connector is exported as LLaVA's two-layer projector with `projector_hidden_act="linear"`
and linear_2 = identity (exact in fp32: x·I adds only zeros). Graft's `vision.feature_layer` k
counts encoder layers; HF's `vision_feature_layer` indexes `hidden_states`, whose entry 0 is the
embedding output, so k ↦ (k mod L) − L. SigLIP features are used in full; CLIP's drop the class
token (LLaVA's "default" strategy), as `HFVisionTower.features` does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from graft.errors import UserError
from graft.models.connectors import LinearProjector
from graft.models.hf import llama_config, siglip_vision_config
from graft.models.hf_backbones import HFLanguageModel, HFVisionTower

_PROJ = "model.multi_modal_projector."
TRAINING_ONLY = ("spatial_head.", "cell_head.")  # data.spatial_compare's, data.cell_targets': never used to answer, not exported


def llava_key(key: str, model) -> str:
    """The LLaVA name of graft VLM state-dict key `key`."""
    part, _, rest = key.partition(".")
    if part == "vision":
        return "model.vision_tower." + (rest.removeprefix("model.") if isinstance(model.vision, HFVisionTower) else rest)
    if part == "connector":
        return _PROJ + rest
    if part != "lm":
        raise KeyError(key)
    if isinstance(model.lm, HFLanguageModel):
        rest = rest.removeprefix("model.")
        base = model.lm.model.base_model_prefix + "."
        return "model.language_model." + rest[len(base):] if rest.startswith(base) else rest
    return rest if rest.startswith("lm_head.") else "model.language_model." + rest


def uses_cls_token(model) -> bool:
    return isinstance(model.vision, HFVisionTower) and model.vision.has_cls


def llava_config(model, cfg, tok):
    """The LlavaConfig describing graft VLM `model` built from `cfg` with tokenizer `tok`."""
    # lazy: transformers takes ~0.5 s to import
    from transformers import LlavaConfig

    if isinstance(model.vision, HFVisionTower):
        vision_config = copy.deepcopy(model.vision.model.config)
    else:
        vision_config = siglip_vision_config(cfg.vision)
    if isinstance(model.lm, HFLanguageModel):
        text_config = copy.deepcopy(model.lm.model.config)
    else:
        text_config = llama_config(cfg.lm)
    text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id = tok.bos, tok.eos, tok.pad
    tie = bool(getattr(text_config, "tie_word_embeddings", False))
    if tie and isinstance(model.lm, HFLanguageModel) and not hasattr(model.lm.model.get_decoder(), "embed_tokens"):
        # LLaVA ties lm_head to `...language_model.embed_tokens` by name; GPT-2 calls it `wte`.
        # Exported untied instead: lm_head holds a copy of the same values.
        text_config.tie_word_embeddings = tie = False
    layers = cfg.vision.layers
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.image,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="linear" if isinstance(model.connector, LinearProjector) else "gelu",
        vision_feature_select_strategy="default" if uses_cls_token(model) else "full",
        vision_feature_layer=cfg.vision.feature_layer % layers - layers,
        multimodal_projector_bias=True,
        tie_word_embeddings=tie,
    )


def to_llava_state_dict(model) -> dict[str, torch.Tensor]:
    """graft VLM weights under LLaVA names (a linear connector gains an identity linear_2)."""
    sd = {llava_key(k, model): v for k, v in model.state_dict().items() if not k.startswith(TRAINING_ONLY)}
    if isinstance(model.connector, LinearProjector):
        d = model.connector.linear_1.out_features
        w = model.connector.linear_1.weight
        sd[_PROJ + "linear_2.weight"] = torch.eye(d, dtype=w.dtype, device=w.device)
        sd[_PROJ + "linear_2.bias"] = torch.zeros(d, dtype=w.dtype, device=w.device)
    return sd


def to_llava(model, cfg, tok):
    """A `LlavaForConditionalGeneration` holding graft VLM `model`'s weights (eval mode, fp32)."""
    # lazy: transformers takes ~0.5 s to import
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration(llava_config(model, cfg, tok))
    missing, unexpected = hf.load_state_dict(to_llava_state_dict(model), strict=False)
    if missing or unexpected:  # a bug in the mapping, not a user error: say exactly what
        raise RuntimeError(f"LLaVA export: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    hf.generation_config = GenerationConfig(bos_token_id=tok.bos, eos_token_id=tok.eos, pad_token_id=tok.pad,
                                            do_sample=False)
    return hf.eval()


def read_llava(folder: Path) -> dict[str, torch.Tensor]:
    """A LLaVA folder's weights under transformers 5 names. transformers itself reads the folder
    (safetensors only, never a pickle), because save_pretrained writes the legacy layout
    (`language_model.model.*`, `vision_tower.*`) and renames on load."""
    # lazy: transformers takes ~0.5 s to import
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot read its config.json ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(config, LlavaConfig):
        raise UserError(f"{folder}: model type '{config.model_type}' is not llava")
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(str(folder), config=config, dtype=torch.float32,
                                                           use_safetensors=True, local_files_only=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot read its safetensors weights ({str(e).splitlines()[0][:100]})") from None
    return hf.state_dict()


def load_llava_weights(model, folder: str | Path) -> None:
    """Load an HF LLaVA folder's weights into graft VLM `model` (whose architecture must match)."""
    llava = read_llava(Path(folder))
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(TRAINING_ONLY)}  # a head starts fresh
    names = {k: llava_key(k, model) for k in own}
    loaded = {k: llava[h] for k, h in names.items() if h in llava}
    # Tied weights (lm_head = embed_tokens) are saved once; the twin is filled by the load.
    ptrs = {own[k].data_ptr() for k in loaded}
    missing = [names[k] for k in own if k not in loaded and own[k].data_ptr() not in ptrs]
    extra = set(llava) - set(names.values())
    if isinstance(model.connector, LinearProjector):
        extra -= {_PROJ + "linear_2.weight", _PROJ + "linear_2.bias"}
        _check_identity(llava, folder)
    if missing or extra:
        raise UserError(f"{folder} does not fit this model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(extra)[:3]} (set the config to the folder's architecture)")
    bad = [k for k, v in loaded.items() if v.shape != own[k].shape]
    if bad:
        raise UserError(f"{folder}: {names[bad[0]]} has shape {tuple(loaded[bad[0]].shape)}, "
                        f"this model's is {tuple(own[bad[0]].shape)}")
    model.load_state_dict(loaded, strict=False)


def _check_identity(llava: dict, folder) -> None:
    w, b = llava.get(_PROJ + "linear_2.weight"), llava.get(_PROJ + "linear_2.bias")
    if w is None or not torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)) or (b is not None and b.abs().max() > 0):
        raise UserError(f"{folder}: its projector has a trained linear_2; use connector.kind=mlp")
