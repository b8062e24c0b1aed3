"""Prefix fusion (LLaVA): vision → connector → image tokens spliced into the LM's input; on a source
of series (data.source=sensors) the series tower (models/series.py, section `series`) in the vision
tower's place. Its
processor, world batches and token count serve the other designs that generate (flamingo, fuyu).
BLIP-2's stage 2 is this design with `connector.kind=qformer` and `connector.init_from=STAGE1_RUN`
(the stage-1 run is checked here). With `distill.teachers` (graft VLM runs) the trainer also holds
frozen teachers and adds `distill_logits` / `distill_hidden` (graft/distill_lm.py, vlm_teachers.py)."""

from __future__ import annotations

from pathlib import Path

from graft import distill_lm
from graft.data.hf_tokenizer import HFChatTokenizer, TemplateProcessor
from graft.data.processor import Processor
from graft.designs.registry import GENERATES, Design, register
from graft.data.series_processor import SeriesProcessor
from graft.data.sources import source_kind
from graft.designs import vlm_teachers
from graft.designs.shared import (builtin_lm, check_something_trains, check_tower_sections, item_tower, lm_losses,
                                  resolve_vocab, validate_vision, with_heads)
from graft.distill import DistillConfig, loss_names, teacher_weights
from graft.errors import UserError
from graft.models.connectors import CONNECTORS, check_connector, per_patch
from graft.models.decoder import LMConfig
from graft.models.hf_backbones import HFLanguageModel
from graft.models.modality import IMAGES, TIME_SERIES
from graft.models.qformer import QFormerConfig
from graft.models.series import SeriesConfig
from graft.models.vlm import VLM
from graft.parts import VISION_ARCH
from graft.rundir import RunDir

PARTS = ("vision", "connector", "lm", "lm_image")
STAGE1 = "qformer_stage1"  # the design whose runs `connector.init_from` names (designs/qformer_stage1.py)


def build(cfg, tok, pretrained: bool = True):
    resolve_vocab(cfg, tok)
    lm = HFLanguageModel.load(cfg.lm, pretrained) if cfg.lm.hf_module else builtin_lm(cfg.lm, pretrained)
    modality = source_kind(cfg).modality
    placeholder = tok.image if modality is IMAGES else tok.placeholder(modality.token)
    if not cfg.distill.teachers:
        return with_heads(VLM(item_tower(cfg, pretrained), cfg.connector, lm, placeholder, modality), cfg)
    widths = [RunDir(path).config().lm.hidden_size for path in cfg.distill.paths]  # the student's maps to them
    return with_heads(vlm_teachers.DistilledVLM(item_tower(cfg, pretrained), cfg.connector, lm, placeholder, modality,
                                                       pairs=vlm_teachers.teacher_pairs(cfg), teacher_widths=widths,
                                                       pad=tok.pad), cfg)


def teacher(cfg, model, tok):
    return vlm_teachers.teacher(cfg, model, tok, build)


def objectives(cfg, model) -> dict:
    if not cfg.distill.teachers:
        return {}
    return distill_lm.objectives(cfg.distill, teacher_weights(cfg.distill), model.pad)


def config_losses(cfg) -> tuple[str, ...]:
    return lm_losses(cfg) + loss_names(cfg.distill, distill_lm.DEFAULT)


def sources(cfg) -> None:
    check_stage1_run(cfg)
    vlm_teachers.check_sources(cfg, build)


def processor(cfg, tok, model):
    if source_kind(cfg).modality is TIME_SERIES:
        return SeriesProcessor(tok, cfg.series, model.num_image_tokens, cfg.lm.max_seq_len, one_length(cfg, model))
    v = cfg.vision
    cls = TemplateProcessor if isinstance(tok, HFChatTokenizer) else Processor
    return cls(tok, v.image_size, model.num_image_tokens, cfg.lm.max_seq_len, v.image_mean, v.image_std)


def one_length(cfg, model) -> str | None:
    """Why this series model reads recordings of series.length steps only (None: any length)."""
    kind = cfg.connector.kind
    if why := cfg.series.one_length():
        return why
    if model.num_image_tokens != model.connector.num_tokens(model.vision.num_patches):
        return f"model={cfg.model} gives a recording one token"  # Flamingo's <series> for its cross-attention
    if not per_patch(kind):
        return f"connector.kind={kind} reads recordings of one length; linear and mlp read any"
    return None


def tokens(batch, pad: int) -> int:
    return int((batch["input_ids"] != pad).sum())


def train_inputs(cfg) -> dict:
    """In training the LM head runs only where an answer token is predicted, unless distillation
    reads the logits: the same loss for fewer FLOPs (models/vlm.py)."""
    return {} if cfg.distill.teachers else {"answers_only": True}


def validate(cfg) -> None:
    parts = [p for p in PARTS if p != "lm_image" or cfg.lm.modality_norms or cfg.lm.modality_ffn]
    if "lm_image" in cfg.train.freeze and "lm_image" not in parts:
        raise UserError("train.freeze: lm_image: this model has none (see lm.modality_norms, lm.modality_ffn)")
    check_something_trains(parts, cfg.train.freeze)
    check_tower_sections(cfg)
    DistillConfig.check(cfg.distill, distill_lm.LOSSES, distill_lm.DEFAULT, ("logits",))
    if cfg.distill.precomputed:
        raise UserError("distill.precomputed: a VLM teacher's outputs are per answer token, not per record; "
                        "precomputed outputs are for dual encoders so far")
    if cfg.distill.layers:
        vlm_teachers.teacher_pairs(cfg)
    if source_kind(cfg).modality is TIME_SERIES:
        return validate_series(cfg)
    v = cfg.vision  # the built-in tower's grid and LM's width (HF ones are checked when the model is built)
    check_connector(cfg.connector, None if v.hf_path else (v.image_size // v.patch_size) ** 2,
                          None if cfg.lm.hf_module else cfg.lm.hidden_size)
    LMConfig.check(cfg.lm, image_grid=CONNECTORS[cfg.connector.kind].grid)
    validate_vision(cfg)


def validate_series(cfg) -> None:
    """A series' tokens are a line, not a grid (a connector that merges a grid's neighbours refuses
    them), through the built-in LM (an HF LM's chat template has no series placeholder yet)."""
    SeriesConfig.check(cfg.series)
    if cfg.connector.init_from:
        raise UserError(f"connector.init_from={cfg.connector.init_from}: a stage-1 Q-Former run reads images, not series")
    for key, default in (("image_attention", "causal"), ("image_positions", "1d"), ("image_cells", False), ("hf_path", None)):
        if getattr(cfg.lm, key) != default:
            raise UserError(f"lm.{key}={getattr(cfg.lm, key)} is not available with series data (data.source={cfg.data.source})")
    check_connector(cfg.connector, cfg.series.num_patches, cfg.lm.hidden_size)
    LMConfig.check(cfg.lm, image_grid=False)


def check_stage1_run(cfg) -> None:
    """`connector.init_from`, when set, names a finished stage-1 Q-Former run with this config's
    Q-Former and image-encoder architecture (its tower comes with its Q-Former: the queries read
    its features)."""
    path, key = cfg.connector.init_from, "connector.init_from"
    if not path:
        return
    run = RunDir(path)
    if not run.config_path.is_file():
        raise UserError(f"{key}={path} is not a graft run directory (no config.yaml)")
    src = run.config()
    if src.model != STAGE1:
        raise UserError(f"{key}={path} is a model={src.model} run, not a Q-Former stage-1 run (model={STAGE1})")
    if run.latest_checkpoint() is None:
        raise UserError(f"{key}={path} has no complete checkpoint")
    for name in QFormerConfig.ARCH:
        mine, theirs = getattr(cfg.connector.qformer, name), getattr(src.qformer, name)
        if mine != theirs:
            raise UserError(f"connector.qformer.{name}={mine} differs from qformer.{name}={theirs} of the stage-1 run {path}")
    if cfg.vision.init_from and Path(cfg.vision.init_from).resolve() != Path(path).resolve():
        raise UserError(f"vision.init_from={cfg.vision.init_from} conflicts with {key}={path}, which brings "
                        "the image encoder its Q-Former was trained on")
    for name in () if cfg.vision.init_from else (*VISION_ARCH, "feature_layer", "hf_path"):
        mine, theirs = getattr(cfg.vision, name), getattr(src.vision, name)
        if mine != theirs:
            raise UserError(f"vision.{name}={mine} differs from vision.{name}={theirs} of the stage-1 run {path} "
                            "(its Q-Former reads that image encoder)")


register("vlm", Design(frozenset({GENERATES}), ("vision", "connector", "lm", "series", "distill"), PARTS, build,
                       processor, tokens, validate, losses=("lm",), packs=True, sources=sources, exports_llava=True,
                       config_losses=config_losses, train_inputs=train_inputs, teacher=teacher, objectives=objectives,
                       config_sections={"series": SeriesConfig, "distill": DistillConfig},
                       modalities=frozenset({IMAGES.name, TIME_SERIES.name})))
