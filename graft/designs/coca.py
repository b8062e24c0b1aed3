"""CoCa (models/coca.py): a dual encoder whose causal text tower also feeds a captioning decoder over
the image's patch tokens, trained with the contrastive loss `itc` and the captioning loss `caption`
(open_clip's weights 1 and 2 in the recipe: `train.objectives`). It embeds (zero-shot, retrieval)
and captions, and the built-in world's evaluation scores both (eval/world.py)."""

from __future__ import annotations

from graft.data.contrastive import CaptionerProcessor
from graft.designs.dual import tokens
from graft.designs.registry import CAPTIONS, EMBEDS, Design, register
from graft.designs.shared import check_tower_sections, validate_vision
from graft.errors import UserError
from graft.models.coca import CoCa, CoCaConfig
from graft.models.dual_encoder import PARTS as DUAL_PARTS
from graft.models.dual_encoder import ContrastiveConfig
from graft.models.text_encoder import TextConfig

PARTS = (*DUAL_PARTS, "decoder")


def build(cfg, tok, pretrained: bool = True):
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.text.vocab_size < len(tok):
        raise UserError(f"text.vocab_size={cfg.text.vocab_size} is smaller than the tokenizer's {len(tok)}")
    return CoCa(cfg.vision, cfg.text, cfg.contrastive, tok.eos, cfg.coca, tok.bos, tok.pad)


def processor(cfg, tok, model):
    return CaptionerProcessor(tok, cfg.vision.image_size, cfg.text.max_len)


def validate(cfg) -> None:
    TextConfig.check(cfg.text)
    ContrastiveConfig.check(cfg.contrastive)
    CoCaConfig.check(cfg.coca)
    check_tower_sections(cfg)
    validate_vision(cfg)
    if cfg.eval.itm_rerank:
        raise UserError(f"eval.itm_rerank={cfg.eval.itm_rerank}: model=coca has no image–text matching to re-rank with")
    if not cfg.text.causal or cfg.text.pool != "eos":
        raise UserError(f"model=coca: the text tower is CoCa's unimodal decoder, so text.causal must be true and "
                        f"text.pool eos (got {cfg.text.causal}, {cfg.text.pool})")
    for key in ("itm_layers", "mlm_prob", "mim_prob"):
        if getattr(cfg.contrastive, key):
            raise UserError(f"contrastive.{key}: model=coca does not train it (model=dual does)")
    if cfg.contrastive.shared_tower:
        raise UserError("contrastive.shared_tower=true (CLIPPO) has no text tower to caption with; model=coca needs one")


register("coca", Design(frozenset({EMBEDS, CAPTIONS}), ("vision", "text", "contrastive", "coca"), PARTS, build,
                        processor, tokens, validate, losses=("itc", "caption"),
                        config_sections={"text": TextConfig, "contrastive": ContrastiveConfig, "coca": CoCaConfig}))
