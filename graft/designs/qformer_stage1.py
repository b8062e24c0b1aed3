"""BLIP-2 stage 1: a Q-Former's queries learn to read a (frozen) image encoder, with image-text
contrast, matching and grounded generation (ITC + ITM + ITG). Stage 2 is the `vlm` design with
`connector.kind=qformer` and `connector.init_from=STAGE1_RUN`. On a source of series the series
tower takes the image encoder's place (series–caption pairs, recordings of one length); stage 2
from such a run is not built yet."""

from __future__ import annotations

from graft.data.contrastive import ContrastiveProcessor, SeriesPairProcessor
from graft.data.sources import source_kind
from graft.designs.dual import tokens
from graft.designs.registry import EMBEDS, Design, register
from graft.designs.shared import check_something_trains, check_tower_sections, item_tower, validate_vision
from graft.designs.vlm import STAGE1
from graft.errors import UserError
from graft.models.blip2 import PARTS, QFormerStage1
from graft.models.modality import IMAGES, TIME_SERIES
from graft.models.qformer import QFormerConfig
from graft.models.series import SeriesConfig


def build(cfg, tok, pretrained: bool = True):
    return QFormerStage1(item_tower(cfg, pretrained), cfg.qformer, len(tok), tok.pad, source_kind(cfg).modality)


def processor(cfg, tok, model):
    if source_kind(cfg).modality is TIME_SERIES:
        return SeriesPairProcessor(tok, cfg.series, cfg.qformer.max_text_len,
                                   one_length="the Q-Former's queries read every token of a recording")
    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.qformer.max_text_len)


def validate(cfg) -> None:
    QFormerConfig.check(cfg.qformer)
    check_something_trains(PARTS, cfg.train.freeze)
    if cfg.train.batch_size // cfg.train.grad_accum < 2:
        raise UserError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} "
                        "gives micro-batches of one pair: ITM draws its negatives from the micro-batch (need ≥ 2)")
    check_tower_sections(cfg)
    if source_kind(cfg).modality is TIME_SERIES:
        SeriesConfig.check(cfg.series)
    else:
        validate_vision(cfg)


register(STAGE1, Design(frozenset({EMBEDS}), ("vision", "qformer", "series"), PARTS, build, processor,
                        tokens, validate, losses=("itc", "itm", "itg"),
                        config_sections={"qformer": QFormerConfig, "series": SeriesConfig},
                        modalities=frozenset({IMAGES.name, TIME_SERIES.name})))
