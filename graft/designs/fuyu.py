"""Fuyu: no vision encoder, raw patches → one linear map → the LM; each row of patches ends with a
newline token. With `eve.teacher` (EVE) the LM is also taught a frozen tower's features of its
patches: the trainer holds the tower (`teacher`) and adds the loss `align` (`objectives`). On a
source of series the patches are a recording's (models/series.py `SeriesPatches`: normalised steps
of all channels, the statistics first), one run of tokens per recording, no newlines."""

from __future__ import annotations

import dataclasses

import torch

from graft.data.processor import Processor
from graft.designs.registry import GENERATES, Design, register
from graft.data.sources import source_kind
from graft.designs.shared import (builtin_lm, check_something_trains, check_tower_sections, lm_losses, resolve_vocab,
                                  with_heads)
from graft.designs.vlm import processor as vlm_processor
from graft.designs.vlm import tokens, train_inputs
from graft.errors import UserError
from graft.losses import cosine_distance_sum
from graft.models.connectors import per_patch
from graft.models.decoder import LMConfig
from graft.models.fuyu import READS, AlignedFuyu, EveConfig, Patches
from graft.models.modality import IMAGES, TIME_SERIES
from graft.models.series import PATCHES_READ, SeriesConfig, SeriesPatches
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM
from graft.objectives import Objective, Teacher
from graft.parts import load_teacher, teacher_config

PARTS = ("connector", "lm", "lm_image")


def build(cfg, tok, pretrained: bool = True):
    resolve_vocab(cfg, tok)
    lm = builtin_lm(cfg.lm, pretrained)
    if source_kind(cfg).modality is TIME_SERIES:
        return VLM(SeriesPatches(cfg.series), cfg.connector, lm, tok.placeholder(TIME_SERIES.token), TIME_SERIES)
    if not cfg.eve.teacher:
        return with_heads(VLM(Patches(cfg.vision), cfg.connector, lm, tok.image), cfg)
    seen_as, v = teacher_config(cfg.eve.teacher), cfg.vision
    theirs, mine = seen_as.num_patches, (v.image_size // v.patch_size) ** 2
    if theirs != mine:
        raise UserError(f"eve.teacher sees {theirs} patches per image, this model {mine}: their grids must match "
                        "(image_size / patch_size)")
    return with_heads(AlignedFuyu(v, cfg.connector, lm, tok.image, seen_as.hidden_size, cfg.eve.layer), cfg)


def teacher(cfg, model, tok) -> Teacher | None:
    """EVE's frozen tower, reading the student's images normalised its own way
    (x_teacher = x · scale + shift); loading it leaves the global RNG alone."""
    if not cfg.eve.teacher:
        return None
    with torch.random.fork_rng():
        tower, seen_as = load_teacher(cfg.eve.teacher)
    mean, std = torch.tensor(cfg.vision.image_mean), torch.tensor(cfg.vision.image_std)
    its_mean, its_std = torch.tensor(seen_as.image_mean), torch.tensor(seen_as.image_std)
    scale, shift = (std / its_std)[:, None, None], ((mean - its_mean) / its_std)[:, None, None]

    def read(tower, batch):
        pixels = batch["pixel_values"]
        return tower.features(pixels * scale.to(pixels.device) + shift.to(pixels.device))

    return Teacher(tower, read)


def objectives(cfg, model) -> dict[str, Objective]:
    """`align`: the cosine distance of the student's aligned patch states to the teacher's
    features, summed over the image tokens."""
    if not cfg.eve.teacher:
        return {}
    image = model.image_token_id
    return {"align": Objective(lambda out, batch, taught: cosine_distance_sum(out["aligned"], taught),
                               lambda batch: (batch["input_ids"] == image).sum())}


def processor(cfg, tok, model):
    if source_kind(cfg).modality is TIME_SERIES:
        return vlm_processor(cfg, tok, model)
    v = cfg.vision
    return Processor(tok, v.image_size, model.num_image_tokens, cfg.lm.max_seq_len, v.image_mean, v.image_std,
                     image_row=v.image_size // v.patch_size)


def validate(cfg) -> None:
    series = source_kind(cfg).modality is TIME_SERIES
    check_tower_sections(cfg)
    section, cls, reads = ("series", SeriesConfig, PATCHES_READ) if series else ("vision", VisionConfig, READS)
    defaults = cls()
    for key in (f.name for f in dataclasses.fields(cls) if f.name not in reads):
        if getattr(getattr(cfg, section), key) != getattr(defaults, key):
            raise UserError(f"{section}.{key} has no effect with model=fuyu: it has no encoder "
                            f"(it reads {section}.{f', {section}.'.join(reads)})")
    if series:
        SeriesConfig.check(cfg.series)
        if cfg.eve.teacher:
            raise UserError(f"eve.teacher={cfg.eve.teacher}: EVE's teachers are image towers; data.source="
                            f"{cfg.data.source} gives series")
        if cfg.lm.image_cells:
            raise UserError(f"lm.image_cells is not available with series data (data.source={cfg.data.source}): "
                            "a series' patches form a line, not a grid")
    if not per_patch(cfg.connector.kind):
        raise UserError(f"connector.kind={cfg.connector.kind}: model=fuyu projects each raw patch (linear or mlp)")
    if cfg.lm.hf_module:
        raise UserError("model=fuyu needs the built-in decoder: with lm.hf_path, set lm.builtin=true")
    for key in ("image_attention", "image_positions"):
        if getattr(cfg.lm, key) != getattr(LMConfig(), key):
            raise UserError(f"lm.{key} needs each image as one run of tokens; model=fuyu ends every row with a newline")
    if not series and cfg.vision.image_size % cfg.vision.patch_size:
        raise UserError(f"vision.image_size={cfg.vision.image_size} is not a multiple of vision.patch_size={cfg.vision.patch_size}")
    EveConfig.check(cfg.eve, cfg.lm.layers)
    check_something_trains(PARTS[:2], cfg.train.freeze)  # lm_image alone is no model


register("fuyu", Design(frozenset({GENERATES}), ("vision", "connector", "lm", "eve", "series"), PARTS, build,
                        processor, tokens, validate, losses=("lm",), packs=True,
                        config_losses=lambda cfg: lm_losses(cfg) + (("align",) if cfg.eve.teacher else ()),
                        teacher=teacher, objectives=objectives, train_inputs=train_inputs,
                        config_sections={"eve": EveConfig, "series": SeriesConfig},
                        modalities=frozenset({IMAGES.name, TIME_SERIES.name})))
