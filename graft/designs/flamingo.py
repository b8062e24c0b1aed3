"""Flamingo: gated cross-attention blocks between the LM's layers read the images (through the
connector, a Perceiver resampler in the recipes). Rows are made as for `vlm`. On a source of series
the series tower takes the ViT's place: each recording is one `<series>` token, its features read
through the cross-attention (recordings of series.length steps only)."""

from __future__ import annotations

from graft.designs.registry import GENERATES, Design, register
from graft.data.sources import source_kind
from graft.designs.shared import (builtin_lm, check_something_trains, check_tower_sections, item_tower, lm_losses,
                                  resolve_vocab, validate_vision)
from graft.designs.vlm import processor, tokens, train_inputs
from graft.errors import UserError
from graft.models.connectors import check_connector
from graft.models.flamingo import Flamingo, FlamingoConfig
from graft.models.modality import IMAGES, TIME_SERIES
from graft.models.series import SeriesConfig

PARTS = ("vision", "connector", "lm", "xattn")


def build(cfg, tok, pretrained: bool = True):
    resolve_vocab(cfg, tok)
    modality = source_kind(cfg).modality
    placeholder = tok.image if modality is IMAGES else tok.placeholder(modality.token)
    return Flamingo(item_tower(cfg, pretrained), cfg.connector, builtin_lm(cfg.lm, pretrained), placeholder, cfg.flamingo,
                    modality)


def validate(cfg) -> None:
    if cfg.lm.hf_module:
        raise UserError("model=flamingo needs the built-in decoder: with lm.hf_path, set lm.builtin=true")
    for key in ("image_attention", "image_positions", "image_cells", "modality_norms", "modality_ffn"):
        if getattr(cfg.lm, key) != getattr(type(cfg.lm)(), key):
            raise UserError(f"lm.{key} has no effect with model=flamingo: images do not enter the LM's sequence")
    for key in ("spatial_compare", "cell_targets"):
        if getattr(cfg.data, key):
            raise UserError(f"data.{key} is not available with model=flamingo: its head reads positions of the "
                            "sequence of a VLM's own decoder (model=vlm or fuyu)")
    FlamingoConfig.check(cfg.flamingo, cfg.lm.layers)
    check_something_trains(PARTS, cfg.train.freeze)
    check_tower_sections(cfg)
    if source_kind(cfg).modality is TIME_SERIES:
        SeriesConfig.check(cfg.series)
        check_connector(cfg.connector, cfg.series.num_patches, cfg.lm.hidden_size)
        return
    v = cfg.vision
    check_connector(cfg.connector, None if v.hf_path else (v.image_size // v.patch_size) ** 2, cfg.lm.hidden_size)
    validate_vision(cfg)


register("flamingo", Design(frozenset({GENERATES}), ("vision", "connector", "lm", "flamingo", "series"), PARTS, build,
                            processor, tokens, validate, losses=("lm",), packs=True, config_losses=lm_losses,
                            train_inputs=train_inputs, config_sections={"flamingo": FlamingoConfig, "series": SeriesConfig},
                            modalities=frozenset({IMAGES.name, TIME_SERIES.name})))
