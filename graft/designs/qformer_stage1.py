"""BLIP-2 stage 1: a Q-Former's queries learn to read a (frozen) image encoder, with image-text
contrast, matching and grounded generation (ITC + ITM + ITG). Stage 2 is the `vlm` design with
`connector.kind=qformer` and `connector.init_from=STAGE1_RUN`."""

from __future__ import annotations

from graft.data.contrastive import ContrastiveProcessor
from graft.designs.dual import tokens
from graft.designs.registry import EMBEDS, Design, register
from graft.designs.shared import check_something_trains, validate_vision, vision_tower
from graft.designs.vlm import STAGE1
from graft.errors import UserError
from graft.models.blip2 import PARTS, QFormerStage1
from graft.models.qformer import QFormerConfig


def build(cfg, tok, pretrained: bool = True):
    return QFormerStage1(vision_tower(cfg, pretrained), cfg.qformer, len(tok), tok.pad)


def processor(cfg, tok, model):
    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.qformer.max_text_len)


def validate(cfg) -> None:
    QFormerConfig.check(cfg.qformer)
    check_something_trains(PARTS, cfg.train.freeze)
    if cfg.train.batch_size // cfg.train.grad_accum < 2:
        raise UserError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} "
                        "gives micro-batches of one pair: ITM draws its negatives from the micro-batch (need ≥ 2)")
    validate_vision(cfg)


register(STAGE1, Design(frozenset({EMBEDS}), ("vision", "qformer"), PARTS, build, processor,
                          tokens, validate, losses=("itc", "itm", "itg"), config_sections={"qformer": QFormerConfig}))
