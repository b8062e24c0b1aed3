"""`graft export RUN --format hf --out OUT`: a run as a Hugging Face LLaVA folder.

OUT holds `config.json`, `generation_config.json`, `model.safetensors` (fp32, LoRA merged) for
`AutoModelForImageTextToText` / `LlavaForConditionalGeneration`, and the processor files for
`AutoProcessor` (`LlavaProcessor`): the run's tokenizer with a chat template, and a
`SiglipImageProcessor` config (resize to the tower's size, bicubic; rescale 1/255; the run's
mean/std) — the same pixels as graft's `Processor.pixels` up to float rounding (~1e-7).

Where the HF processor can differ from graft's: images with transparency (graft composites alpha
onto black, HF onto white); and for `lm.hf_path` runs, templates that add a BOS token both in the
text and through the tokenizer. The tokenizer is what the run trained with, so for graft's own
tokenizer `processor.apply_chat_template` + `processor(text, images)` give graft's input ids.
"""

from __future__ import annotations

from pathlib import Path

from graft.build import load_run
from graft.data.hf_tokenizer import GRAFT_TEMPLATE, IMAGE_TOKEN, HFChatTokenizer
from graft.data.sources import source_kind
from graft.designs import design
from graft.errors import UserError
from graft.models.connectors import per_patch
from graft.models.hf_llava import to_llava, uses_cls_token
from graft.models.lora import merge_lora
from graft.models.modality import IMAGES
from graft.rundir import RunDir

FORMATS = ("hf",)


def hf_tokenizer(tok):
    """The run's tokenizer as a transformers fast tokenizer with a chat template."""
    # lazy: transformers takes ~0.5 s to import
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, HFChatTokenizer):
        return tok.tok
    return PreTrainedTokenizerFast(
        tokenizer_object=tok.tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, chat_template=GRAFT_TEMPLATE,
    )


def hf_processor(cfg, tok, model):
    # lazy: transformers takes ~0.5 s to import
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil


    size = cfg.vision.image_size
    images = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=list(cfg.vision.image_mean),
                                     image_std=list(cfg.vision.image_std), resample=3)  # 3 = PIL bicubic
    text = hf_tokenizer(tok)
    cls = uses_cls_token(model)
    return LlavaProcessor(image_processor=images, tokenizer=text, patch_size=cfg.vision.patch_size,
                          vision_feature_select_strategy="default" if cls else "full",
                          num_additional_image_tokens=1 if cls else 0, chat_template=text.chat_template,
                          image_token=IMAGE_TOKEN)


# settings of the built-in decoder that change what it computes and LLaVA cannot express
LM_OWN = {"modality_norms": False, "modality_ffn": False, "image_cells": False, "image_attention": "causal",
          "image_positions": "1d"}


def export(run_dir: str | Path, out: str | Path, fmt: str = "hf") -> Path:
    """Write the latest checkpoint of `run_dir` to `out` in format `fmt`; returns `out`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    cfg = RunDir(run_dir).require().config()
    what = (f"model={cfg.model}" if not design(cfg.model).exports_llava
            else f"{source_kind(cfg).modality.name} items (data.source={cfg.data.source})" if source_kind(cfg).modality is not IMAGES
            else f"connector.kind={cfg.connector.kind}" if not per_patch(cfg.connector.kind)
            else next((f"lm.{k}={getattr(cfg.lm, k)}" for k, plain in LM_OWN.items() if getattr(cfg.lm, k) != plain), None))
    if what:
        raise UserError(f"--format hf writes LLaVA (a ViT, a linear or MLP connector, an LM); {run_dir} has {what}")
    cfg, tok, model, ckpt = load_run(RunDir(run_dir))
    merge_lora(model.lm)  # LLaVA has no adapters: fold them into the weights
    hf = to_llava(model, cfg, tok)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    hf_processor(cfg, tok, model).save_pretrained(str(out))
    return out
