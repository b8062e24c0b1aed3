"""What several designs share: the vocabulary size, the language model and the image tower a
config names, and the built-in tower's checks."""

from __future__ import annotations

from dataclasses import fields

from graft.data.cells import classes
from graft.data.sources import source_kind
from graft.errors import UserError
from graft.models.cell_head import CellHead
from graft.models.hf_backbones import HFVisionTower, load_into_builtin
from graft.models.modality import IMAGES, TIME_SERIES
from graft.models.series import SeriesConfig, series_tower
from graft.models.spatial_head import SpatialHead
from graft.models.vit import VisionConfig

# each modality's tower section: what a run on a source of that modality reads (the other is refused)
TOWER_SECTIONS = {IMAGES.name: ("vision", VisionConfig), TIME_SERIES.name: ("series", SeriesConfig)}


def resolve_vocab(cfg, tok) -> None:
    if cfg.lm.vocab_size == 0:
        cfg.lm.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.lm.vocab_size < len(tok):
        raise UserError(f"lm.vocab_size={cfg.lm.vocab_size} is smaller than the tokenizer's {len(tok)}")


def vision_tower(cfg, pretrained: bool):
    """The HF tower of vision.hf_path (its weights unless `pretrained` is false), else the built-in
    tower's config."""
    return HFVisionTower.load(cfg.vision, pretrained) if cfg.vision.hf_path else cfg.vision


def item_tower(cfg, pretrained: bool):
    """The tower of the run's items: a series tower for a source of series, else `vision_tower`."""
    return series_tower(cfg.series) if source_kind(cfg).modality is TIME_SERIES else vision_tower(cfg, pretrained)


def check_tower_sections(cfg) -> None:
    """The section of the source's modality's tower is read; a setting of another tower's would change
    nothing, so it is refused."""
    modality = source_kind(cfg).modality
    for name, (section, cls) in TOWER_SECTIONS.items():
        if name == modality.name:
            continue
        mine, default = getattr(cfg, section), cls()
        for f in fields(cls):
            if getattr(mine, f.name) != getattr(default, f.name):
                raise UserError(f"{section}.{f.name}={getattr(mine, f.name)} is not read: data.source={cfg.data.source} "
                                f"gives {modality.name} items, read by the '{TOWER_SECTIONS[modality.name][0]}' section")


def builtin_lm(lm, pretrained: bool):
    """The built-in decoder's config, or with lm.hf_path (lm.builtin) the decoder with the folder's weights."""
    return load_into_builtin(lm, pretrained) if lm.hf_path else lm


def lm_losses(cfg) -> tuple[str, ...]:
    """The built-in LM's auxiliary losses under `cfg` (LanguageModel.aux_losses), and the training
    heads' (`data.spatial_compare`, `data.cell_targets`)."""
    moe = ("moe_balance",) if cfg.lm.moe_experts and cfg.lm.moe_balance == "loss" else ()
    return moe + (("compare",) if cfg.data.spatial_compare else ()) + (("cells",) if cfg.data.cell_targets else ())


def with_heads(model, cfg):
    """`model` (a VLM) with the training-only heads of `data.spatial_compare` (models/spatial_head.py)
    and `data.cell_targets` (models/cell_head.py), built last so that without them a seed gives the
    same weights. The cell head needs one image token per cell of the world's grid."""
    if cfg.data.spatial_compare:
        model.spatial_head = SpatialHead(model.lm.hidden_size)
    if cfg.data.cell_targets:
        cells = cfg.data.grid * cfg.data.grid
        if model.num_image_tokens != cells or model.image_grid != cfg.data.grid:
            raise UserError(f"data.cell_targets=true needs one image token per cell of the {cfg.data.grid}x{cfg.data.grid} "
                            f"grid ({cells}); this model gives {model.num_image_tokens} per image (connector.kind="
                            f"{cfg.connector.kind}, vision.image_size / vision.patch_size = "
                            f"{cfg.vision.image_size // cfg.vision.patch_size})")
        model.cell_head = CellHead(model.lm.hidden_size, classes(cfg.data.grid))
    return model


def validate_vision(cfg) -> None:
    """The built-in tower's settings (shared by every design with a ViT)."""
    VisionConfig.check(cfg.vision)
    if cfg.vision.position_init_std != 0.02 and (cfg.train.init_from or "vision" in cfg.train.init_parts):
        raise UserError(f"vision.position_init_std={cfg.vision.position_init_std} has no effect: the tower's weights "
                        "come from train.init_from / train.init_parts")


def check_something_trains(parts, freeze) -> None:
    if set(parts) <= set(freeze):
        raise UserError(f"train.freeze freezes every part ({', '.join(parts)}): nothing would train")
