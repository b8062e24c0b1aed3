"""Cross-field checks of a `Config` (config.py): each failure names the key and the value.

`validate` runs after every override (`apply_overrides`) and on every loaded config (`load`),
before anything is written, so a run that cannot work (a split that does not exist, a task whose
data is missing, a format that would shell out) stops in one line instead of after training. It
asks the design (graft/designs/), the data sources and the evaluation tasks; config.py, which
only parses and type-checks, asks none of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from graft import config
from graft.data.limits import check_image_formats
from graft.data.sources import SOURCES, source_kind
from graft.designs import DESIGNS, EMBEDS, GENERATES, can_pack, design, model_sections
from graft.errors import UserError
from graft.eval.tasks import TASKS, check_task
from graft.eval.zero_shot import load_prompts, read_prompts

if TYPE_CHECKING:
    from graft.config import Config


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`--set key=value` strings applied (config.override), then the whole config validated."""
    keys = config.override(cfg, overrides)
    for key in keys:  # after all of them: `--set model=...` may come last
        section = key.split(".")[0]
        reads = design(cfg.model).sections
        if section in model_sections() and section not in reads:
            # a key of a model section the design does not read would change nothing
            raise UserError(f"--set {key}: model={cfg.model} does not read the '{section}' section "
                            f"(it reads {', '.join(reads)})")
    return validate(cfg)


def load(path: Path, sources: bool = True) -> Config:
    """A config file, validated; `sources=False` skips the checks of the runs it initialises from
    (a run's own config.yaml: its checkpoints hold the weights, and the sources may be gone)."""
    return validate(config.read(path), sources=sources)


def validate(cfg: Config, sources: bool = True) -> Config:
    """Cross-field checks; each failure names the key and the value. `sources`: also check the runs
    the config initialises from (`train.init_parts`, the design's own, e.g. `connector.init_from`)."""
    _validate_architecture(cfg)
    _validate_parts_and_losses(cfg, sources)
    choices = {
        "train.precision": (cfg.train.precision, ("auto", "fp32", "bf16")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "parallel.kind": (cfg.parallel.kind, ("auto", "none", "ddp", "fsdp2")),
        "parallel.compile_backend": (cfg.parallel.compile_backend, ("inductor", "aot_eager", "eager")),
    }
    choices["data.source"] = (cfg.data.source, tuple(SOURCES))
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise UserError(f"{key}={value!r} is not one of {', '.join(valid)}")
    if cfg.parallel.compile_backend != config.ParallelConfig.compile_backend and not cfg.parallel.compile:
        raise UserError(f"parallel.compile_backend={cfg.parallel.compile_backend} has no effect without parallel.compile=true")
    world = source_kind(cfg).world  # None: a source without one refuses eval.splits itself
    splits = TASKS[world].splits if world else cfg.eval.splits  # of the built-in world of the run's modality
    for split in cfg.eval.splits:
        if split not in splits:
            raise UserError(f"eval.splits: unknown split '{split}' (valid: {', '.join(splits)})")
    _validate_numbers(cfg)
    _validate_documents(cfg)
    _validate_clips(cfg)
    _validate_streaming(cfg)
    _validate_tasks(cfg)
    if cfg.eval.image_root and not Path(cfg.eval.image_root).is_dir():
        raise UserError(f"eval.image_root: folder not found: {cfg.eval.image_root}")
    if cfg.eval.zeroshot_file:  # names a missing file, an empty class list, a bad template
        read_prompts(cfg.eval.zeroshot_file)  # a user's data set's classes are checked against it when read
    for key, fields in (("vqa_prompt", ("question",)), ("mc_prompt", ("question", "options"))):
        template = getattr(cfg.eval, key)
        if any("{" + f + "}" not in template for f in fields):
            raise UserError(f"eval.{key}={template!r} must contain " + " and ".join("{" + f + "}" for f in fields))
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_file():
        raise UserError(f"data.tokenizer: file not found: {cfg.data.tokenizer}")
    _validate_hf(cfg)
    modality = source_kind(cfg).modality.name
    if modality not in design(cfg.model).modalities:
        raise UserError(f"data.source={cfg.data.source} gives {modality} items; model={cfg.model} reads "
                        f"{', '.join(sorted(design(cfg.model).modalities))} items")
    if cfg.data.pack is True and not can_pack(cfg):
        packers = ", ".join(name for name, d in DESIGNS.items() if d.packs)
        raise UserError(f"data.pack=true needs data.source=shapes, model={packers} and the built-in LM (no lm.hf_path)")
    design(cfg.model).validate(cfg)
    _validate_capabilities(cfg)
    if sources:
        design(cfg.model).sources(cfg)
    return cfg


def _validate_capabilities(cfg: Config) -> None:
    """What evaluation reads of `eval.*`, by what the design can do."""
    if cfg.eval.zeroshot_prompt is not None and not design(cfg.model).can(GENERATES):
        raise UserError(f"eval.zeroshot_prompt is for runs that generate text; model={cfg.model} scores class names "
                        "by their embeddings")
    if cfg.eval.itm_rerank and not design(cfg.model).can(EMBEDS):
        raise UserError(f"eval.itm_rerank re-ranks retrieval; model={cfg.model} does not retrieve")
    if not design(cfg.model).can(EMBEDS):
        return
    for key in ("zeroshot_images", "retrieval_pairs", "itm_rerank"):  # zero-shot by similarity, retrieval
        if getattr(cfg.eval, key) < 0:
            raise UserError(f"eval.{key}={getattr(cfg.eval, key)} must not be negative")
    if cfg.eval.zeroshot_file and cfg.eval.splits:
        load_prompts(cfg.eval.zeroshot_file)  # the world's zero-shot: its 24 classes (checked now, not after training)


def _validate_architecture(cfg: Config) -> None:
    v, lm = cfg.vision, cfg.lm
    if v.image_size % v.patch_size:
        raise UserError(f"vision.image_size={v.image_size} is not divisible by vision.patch_size={v.patch_size}")
    if v.hidden_size % v.heads:
        raise UserError(f"vision.hidden_size={v.hidden_size} is not divisible by vision.heads={v.heads}")
    if lm.hidden_size % lm.heads:
        raise UserError(f"lm.hidden_size={lm.hidden_size} is not divisible by lm.heads={lm.heads}")
    if lm.heads % lm.kv_heads:
        raise UserError(f"lm.heads={lm.heads} is not a multiple of lm.kv_heads={lm.kv_heads}")
    if (lm.hidden_size // lm.heads) % 2:
        raise UserError(f"lm head dim {lm.hidden_size // lm.heads} must be even for RoPE")
    if not -v.layers <= v.feature_layer < v.layers:
        raise UserError(f"vision.feature_layer={v.feature_layer} is out of range for {v.layers} layers")


def _validate_parts_and_losses(cfg: Config, sources: bool) -> None:
    """`train.freeze`, `train.init_parts` and `train.objectives` against the design's parts and losses."""
    entry = design(cfg.model)  # names an unknown model
    for part in cfg.train.freeze:
        if part not in entry.parts:
            raise UserError(f"train.freeze: unknown part '{part}' (valid: {', '.join(entry.parts)})")
    for part, path in cfg.train.init_parts.items():
        if part not in entry.parts:
            raise UserError(f"train.init_parts: unknown part '{part}' (valid: {', '.join(entry.parts)})")
        if sources and not Path(path, "config.yaml").is_file():
            raise UserError(f"train.init_parts.{part}: {path} is not a graft run directory (no config.yaml)")
    losses = entry.losses + entry.config_losses(cfg)
    for name, weight in cfg.train.objectives.items():
        if name not in losses:
            raise UserError(f"train.objectives: {name!r} is not a loss of model={cfg.model} (its losses: {', '.join(losses)})")
        if not 0 <= weight < float("inf"):
            raise UserError(f"train.objectives: the weight of {name} is {weight}; it must be finite and ≥ 0")
    if not any(cfg.train.objectives.get(name, 1.0) > 0 for name in losses):
        raise UserError("train.objectives: every loss weighs 0, nothing would train")


def _validate_optim(cfg: Config) -> None:
    o = cfg.optim
    rules = {  # key: (value, whether it is valid, the rule)
        "optim.lr": (o.lr, o.lr >= 0, "must be >= 0"),
        "optim.min_lr_ratio": (o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "must lie in [0, 1] (a fraction of optim.lr)"),
        "optim.warmup_steps": (o.warmup_steps, o.warmup_steps >= 0, "must be >= 0"),
        "optim.weight_decay": (o.weight_decay, o.weight_decay >= 0, "must be >= 0"),
        "optim.beta1": (o.beta1, 0 <= o.beta1 < 1, "must lie in [0, 1)"),
        "optim.beta2": (o.beta2, 0 <= o.beta2 < 1, "must lie in [0, 1)"),
        "optim.grad_clip": (o.grad_clip, o.grad_clip >= 0, "must be >= 0 (0: no clipping)"),
        "optim.decay_fraction": (o.decay_fraction, 0 < o.decay_fraction <= 1, "must be in (0, 1]"),
    }
    for key, (value, valid, rule) in rules.items():
        if not (valid and math.isfinite(value)):  # NaN fails every comparison above
            raise UserError(f"{key}={value} {rule}")
    if o.schedule not in config.SCHEDULES:
        raise UserError(f"optim.schedule={o.schedule!r} is not one of {', '.join(config.SCHEDULES)}")
    if o.schedule != "wsd" and o.decay_fraction != config.OptimConfig.decay_fraction:
        raise UserError(f"optim.decay_fraction={o.decay_fraction} is read by optim.schedule=wsd only")


def _validate_numbers(cfg: Config) -> None:
    positive = {
        "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum, "train.log_every": cfg.train.log_every,
        "train.ckpt_every": cfg.train.ckpt_every, "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "data.max_objects": cfg.data.max_objects, "data.grid": cfg.data.grid,
        "parallel.timeout_s": cfg.parallel.timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key}={value} must be positive")
    if any(not 0 < k <= cfg.train.steps for k in cfg.train.keep_steps):
        raise UserError(f"train.keep_steps={cfg.train.keep_steps}: each must be a step of the run, 1 to train.steps={cfg.train.steps}")
    if cfg.train.max_skipped_steps < 0:
        raise UserError(f"train.max_skipped_steps={cfg.train.max_skipped_steps} must be >= 0 (0: never stop)")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by train.grad_accum={cfg.train.grad_accum}")
    if any(k < 0 for k in cfg.eval.shots) or cfg.eval.documents < 0 or cfg.eval.doc_images < 2:
        raise UserError(f"eval.shots={cfg.eval.shots}, eval.documents={cfg.eval.documents} and eval.doc_images="
                        f"{cfg.eval.doc_images}: shots and documents must be >= 0, doc_images >= 2")
    _validate_optim(cfg)
    _validate_heldout(cfg)
    if cfg.data.max_objects > cfg.data.grid**2:
        raise UserError(f"data.max_objects={cfg.data.max_objects} exceeds the {cfg.data.grid}x{cfg.data.grid} grid")


def _validate_heldout(cfg: Config) -> None:
    """eval.heldout_batches reads records no run trained on: a built-in world's val split."""
    n, kind = cfg.eval.heldout_batches, source_kind(cfg)
    if n < 0:
        raise UserError(f"eval.heldout_batches={n} must be >= 0 (0: off)")
    if n and not (kind.indexed and "val" in kind.splits):
        raise UserError(f"eval.heldout_batches={n}: data.source={cfg.data.source} has no held-out split whose records "
                        "are known unseen (a built-in world's val split: data.source=shapes or sensors)")


def _validate_documents(cfg: Config) -> None:
    """data.images_per_doc: the built-in world's interleaved documents, for designs that read text and images."""
    n = cfg.data.images_per_doc
    if n < 1:
        raise UserError(f"data.images_per_doc={n} must be >= 1")
    options = source_kind(cfg).options
    if cfg.data.text_only and ("text_only" not in options or not design(cfg.model).can(GENERATES) or n > 1):
        raise UserError("data.text_only tells the built-in world's scenes in words to a VLM design: it needs "
                        "data.source=shapes, a VLM model and data.images_per_doc=1")
    _validate_grounding(cfg, options)
    if n == 1:
        return
    if "images_per_doc" not in options:
        raise UserError(f"data.images_per_doc={n} makes the built-in world's documents; with data.source="
                        f"{cfg.data.source} each record holds its own images")
    if not design(cfg.model).can(GENERATES):
        raise UserError(f"data.images_per_doc={n}: model={cfg.model} reads one image per example")


def _validate_clips(cfg: Config) -> None:
    """data.frames, data.frame_labels: the clips of the built-in world in motion, read by a design that reads
    text and images."""
    if "frames" not in source_kind(cfg).options:
        for key in ("frames", "frame_labels"):
            if getattr(cfg.data, key) != getattr(config.DataConfig, key):
                raise UserError(f"data.{key}={getattr(cfg.data, key)} sets the clips of data.source=motion; "
                                f"data.source={cfg.data.source} does not read it")
        return
    if not design(cfg.model).can(GENERATES):
        raise UserError(f"data.source=motion: a clip is several frames; model={cfg.model} pairs one image with its caption")


def _validate_grounding(cfg: Config, options: tuple[str, ...]) -> None:
    """data.grounded_spatial, data.spatial_questions, data.spatial_compare and data.cell_targets: the
    built-in world's one-image conversations, a VLM (for grounding, the world's tokenizer; for the
    spatial head, the built-in decoder; the cell head checks its image tokens when built)."""
    share = cfg.data.grounded_spatial
    if not 0 <= share <= 1:
        raise UserError(f"data.grounded_spatial={share} must be in [0, 1]")
    if share and ("grounded_spatial" not in options or not design(cfg.model).can(GENERATES)
                  or cfg.data.images_per_doc > 1 or cfg.data.text_only or cfg.data.tokenizer or cfg.lm.hf_path):
        raise UserError(f"data.grounded_spatial={share} grounds the built-in world's spatial questions for a VLM: it "
                        "needs data.source=shapes, a VLM model, one image per conversation and the world's own tokenizer")
    more = cfg.data.spatial_questions
    if more < 0:
        raise UserError(f"data.spatial_questions={more} must be 0 or more")
    if more and ("spatial_questions" not in options or not design(cfg.model).can(GENERATES)
                 or cfg.data.images_per_doc > 1 or cfg.data.text_only):
        raise UserError(f"data.spatial_questions={more} adds spatial questions to the built-in world's conversations: "
                        "it needs data.source=shapes, a VLM model and one image per conversation")
    if cfg.data.spatial_compare and ("spatial_compare" not in options or not design(cfg.model).can(GENERATES)
                                     or cfg.data.images_per_doc > 1 or cfg.data.text_only or cfg.lm.hf_module):
        raise UserError("data.spatial_compare=true trains a head on the built-in world's spatial questions: it needs "
                        "data.source=shapes, a VLM model with the built-in decoder and one image per conversation")
    if cfg.data.cell_targets and ("cell_targets" not in options or not design(cfg.model).can(GENERATES)
                                  or cfg.data.images_per_doc > 1 or cfg.data.text_only):
        raise UserError("data.cell_targets=true trains a head on the built-in world's image tokens: it needs "
                        "data.source=shapes, a VLM model and one image per conversation")


def _validate_tasks(cfg: Config) -> None:
    """eval.tasks: known tasks that fit this run's model, on data that exists — checked before training."""
    if not cfg.eval.tasks:
        return
    for entry in cfg.eval.tasks:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise UserError(f"eval.tasks: {entry!r} is not TASK=PATH (e.g. zeroshot=/data/pets)")
        if not check_task(name, cfg.model, f"eval.tasks {entry!r}", source_kind(cfg).modality.name).exists(path):
            raise UserError(f"eval.tasks: {path} (for {name}) not found")


def _validate_streaming(cfg: Config) -> None:
    d = cfg.data
    SOURCES[d.source].check(cfg)  # what the chosen source needs (data/sources.py)
    classify = any(t.partition("=")[0] == "classify" for t in cfg.eval.tasks)
    for key, readers in (("class_prompt", "data.source=ts, arrays or pamap2"), ("imus", "data.source=pamap2"),
                         ("downsample", "data.source=pamap2"), ("window_stride", "data.source=pamap2")):
        if getattr(d, key) != getattr(config.DataConfig(), key) and key not in source_kind(cfg).options and not classify:
            raise UserError(f"data.{key} is read by {readers} and the classify task; this run has neither")
    if not 0 <= d.caption_mix <= 1:
        raise UserError(f"data.caption_mix={d.caption_mix} must be a probability in [0, 1]")
    if d.caption_mix and "caption_mix" not in source_kind(cfg).options:
        raise UserError(f"data.caption_mix mixes webdataset shards' synthetic captions (KEY.syn.txt); this run reads "
                        f"data.source={d.source}")
    if d.noise and "noise" not in source_kind(cfg).options:
        raise UserError("data.noise is read by data.source=noisy (the built-in world's noisy-web pool); this run "
                        f"reads data.source={d.source}")
    if d.weights and (len(d.weights) != len(d.shards) or min(d.weights) <= 0):
        raise UserError(f"data.weights={d.weights} must be {len(d.shards)} positive numbers, one per data.shards entry")
    if d.workers < 0 or d.shuffle_buffer < 0 or d.check_batches < 0:
        raise UserError("data.workers, data.shuffle_buffer and data.check_batches must be >= 0")
    for key in ("max_image_pixels", "max_image_bytes", "max_text_bytes", "max_json_bytes", "max_json_depth", "max_turns",
                "max_images"):
        if getattr(d, key) <= 0:
            raise UserError(f"data.{key}={getattr(d, key)} must be positive")
    check_image_formats(d.image_formats)
    if not 0 <= d.min_good_fraction <= 1:
        raise UserError(f"data.min_good_fraction={d.min_good_fraction} must be between 0 and 1")


def _validate_hf(cfg: Config) -> None:
    """Hugging Face backbones and LoRA (models/hf_backbones.py, models/lora.py)."""
    for key, path in (("vision.hf_path", cfg.vision.hf_path), ("lm.hf_path", cfg.lm.hf_path)):
        if path and not Path(path).is_dir():
            raise UserError(f"{key}: folder not found: {path}")
    if cfg.lm.hf_path and cfg.data.tokenizer:
        raise UserError("data.tokenizer cannot be combined with lm.hf_path (the LM's own tokenizer is used)")
    if cfg.lm.lora_rank < 0:
        raise UserError(f"lm.lora_rank={cfg.lm.lora_rank} must be >= 0 (0 = no LoRA)")
    if cfg.lm.lora_rank and "lm" in cfg.train.freeze:
        raise UserError(f"train.freeze contains 'lm' with lm.lora_rank={cfg.lm.lora_rank}: the adapters would be frozen "
                        "(LoRA already freezes the LM's own weights)")
