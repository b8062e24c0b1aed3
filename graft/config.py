"""The config tree, its override grammar and strict validation.

A run is described by one `Config`: a tree of small typed dataclasses. The model parts' configs
live beside their modules (`models/vit.py`, `models/decoder.py`, `models/connectors.py`); the
run-level ones (data, optimiser, training, evaluation) live here; a section only some designs read
is registered by those designs (`SECTIONS`). Recipes (`recipes.py`) are
functions returning a `Config`; the CLI changes single fields with `--set a.b=value`.

Every unknown key and every wrong type fails with a `UserError` naming the key. This module is a
leaf: it parses, overrides and type-checks, and reads nothing of designs, data or evaluation. The
cross-field checks, which ask the design, the data sources and the evaluation tasks, live in
config_checks.py (`apply_overrides` and `load` there validate as well).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from graft import atomic
from graft.config_values import coerce, field_of, key_of, keyed
from graft.errors import UserError
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import LMConfig
from graft.models.vit import VisionConfig

# Defaults that data modules share (data/limits.py, data/shapes.py import them from here).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # Pillow formats decoded by default
CAPTION_PROMPT = "describe the image."  # the built-in world's caption question, and caption-only records'


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes | noisy | sensors | webdataset | llava | hf | interleaved | ts | arrays | series_shards | pamap2 (graft/data/sources.py)
    seed: int = 0  # world seed: sample i of split s is a pure function of (seed, s, i)
    grid: int = 4  # objects sit in a grid x grid layout of cells
    max_objects: int = 4
    questions_per_image: int = 4  # QA turns per training conversation (amortises the image)
    caption_prob: float = 0.25  # chance a training conversation also asks for the caption
    # Built-in world, training only: the share of spatial questions asked with each object's cell
    # after its name ("the red circle at top left"), the location words supervised (data/grounding.py)
    grounded_spatial: float = 0.0
    # Built-in world, training only: this many more spatial questions in each conversation whose
    # scene allows one (fresh pairs and relations from the world's generator)
    spatial_questions: int = 0
    # Built-in world, training only: a head at each spatial question's answer position learns how
    # the two named objects' columns and rows compare (loss `compare`; models/spatial_head.py)
    spatial_compare: bool = False
    # Built-in world, training only: a head asks each image token for its cell's shape, colour, size,
    # row and column (loss `cells`; models/cell_head.py): a connector that keeps one token per grid cell
    cell_targets: bool = False
    # Images per training item: 1 = one image's conversation; n > 1 = interleaved documents of n images,
    # each with its questions, then questions about them together (data/documents.py)
    images_per_doc: int = 1
    # data.source=motion (data/motion.py): frames per clip, each an image of the example, in order;
    # frame_labels: each frame after its timestamp in the text ("frame 1: ...", LLaVA-Video's way)
    frames: int = 3
    frame_labels: bool = False
    # The scene told in words (its caption) instead of shown: text-only conversations, to pretrain a
    # language model on the world's language, or teach one that has seen images (eval task `text`)
    text_only: bool = False
    # Several conversations per row up to lm.max_seq_len tokens instead of padding every one to the
    # longest (data/packing.py): same loss, less work. Supported for the built-in world with the
    # built-in LM; None (default) = pack there, pad elsewhere; true = pack or fail; false = pad.
    pack: bool | None = None
    # data.source=noisy (data/noisy_world.py): the share of each kind of noise in the built-in world's
    # training pool, e.g. {mismatch: 0.3, boilerplate: 0.1}; empty: that module's DEFAULT_NOISE
    noise: dict[str, float] = field(default_factory=dict)
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one on the world
    vocab_size: int = 384
    # Streaming sources (graft/data/sources.py); the fields above configure the built-in world.
    shards: list[str] = field(default_factory=list)  # webdataset, interleaved, series_shards: one brace pattern per source
    weights: list[float] = field(default_factory=list)  # webdataset: mixing weight per shards entry (default equal)
    path: str | None = None  # llava: conversation .json/.jsonl; hf: save_to_disk folder; interleaved: .jsonl file or folder; ts: a .ts file; arrays: a folder; pamap2: .dat file, folder or glob
    image_root: str | None = None  # llava/hf/interleaved: folder image paths are relative to (default: next to data.path)
    image_column: str = "image"  # hf
    text_column: str = "text"  # hf: a caption string or a conversation list
    caption_prompt: str = CAPTION_PROMPT  # the user turn for caption-only records
    class_prompt: str = "which class is this?"  # ts, arrays, pamap2, series_shards (.cls), and evaluation task classify: the question a label answers
    # pamap2 (graft/data/pamap2.py): the IMUs read (hand, chest, ankle; 6 channels each), time steps
    # averaged per series step (100 Hz / downsample), and steps between window starts (0: series.length)
    imus: list[str] = field(default_factory=lambda: ["hand"])
    downsample: int = 1
    window_stride: int = 0
    # webdataset: the probability that a record is read with its synthetic caption (KEY.syn.txt, from
    # `graft data recaption`) instead of its own; fixed per record (data.seed and its key)
    caption_mix: float = 0.0
    shuffle_buffer: int = 1000  # webdataset: records held for shuffling within a worker
    workers: int = 2  # DataLoader worker processes per rank (0: read in the training process)
    # Bounded work per record (data/limits.py): over-limit records are skipped and counted.
    max_image_pixels: int = 64_000_000  # bigger images are skipped, judged from the header before decoding
    max_image_bytes: int = 32 << 20  # an encoded image file / tar member; bigger ones are never read
    image_formats: list[str] = field(default_factory=lambda: list(IMAGE_FORMATS))  # Pillow format names decoded
    max_text_bytes: int = 64 << 10  # a record's caption or conversation, all turns, UTF-8 bytes
    max_json_bytes: int = 1 << 20  # a .json member or one JSONL line
    max_json_depth: int = 32  # nesting of arrays/objects in a record's JSON
    max_turns: int = 64  # question/answer turns kept per conversation (later ones are dropped, noted)
    # Images per record (LLaVA `image` list, numbered webdataset members, an HF list column); more are
    # skipped (too_many_images) before any is read. 8: multi-image instruction data rarely has more,
    # and each image costs its placeholders in lm.max_seq_len (8 x 576 fills a 4k context).
    max_images: int = 8
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
    min_good_fraction: float = 0.5  # training (first batches) and `graft data check` stop below this
    check_batches: int = 4  # micro-batches checked at the start of training (0: no check)


SCHEDULES = ("cosine", "wsd")  # optim.schedule (graft/trainer/optim.py)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    # after the linear warmup: cosine to the floor at train.steps, or wsd (warmup-stable-decay,
    # Hägele et al. 2024): constant, then linear to the floor over the last decay_fraction of the steps
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd only
    # On matrices (position tables included: exempting the ViT's cost shape accuracy early in a
    # 320-step run, 0.30 vs 0.50, measured); norms, biases and scalars are exempt.
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # AdamW in one fused kernel over all parameters (torch's fused=True; 1.04x the demo's step on a
    # CPU) instead of torch's default multi-tensor loop: the same update up to float rounding.
    fused: bool = True


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # per process, per optimiser step (split into grad_accum micro-batches)
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16: auto = bf16 autocast on GPUs, fp32 on CPUs
    device: str = "auto"  # auto | cpu | cuda
    freeze: list[str] = field(default_factory=list)  # parts to freeze: vision, connector, lm
    init_from: str | None = None  # a run directory whose latest weights initialise the model
    # Parts initialised from other runs, e.g. {connector: runs/stage1}: that run's weights of the
    # part (its latest checkpoint), after init_from; parts are those of train.freeze.
    init_parts: dict[str, str] = field(default_factory=dict)
    log_every: int = 10
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    keep_steps: list[int] = field(default_factory=list)  # steps whose checkpoints are saved and never pruned (WSD branches)
    # Write checkpoints in a background thread (torch.distributed.checkpoint.async_save): training
    # waits only for the copy of the state; the checkpoint counts once every process has written it.
    async_save: bool = False
    eval_every: int = 0  # 0: evaluate only at the end
    peak_flops: float = 0.0  # for MFU; 0 = measure (CPU) or look up the datasheet (GPU)
    # Steps in a row with non-finite gradients (each skipped, never applied) before the run stops
    # as diverged; 0 = never stop.
    max_skipped_steps: int = 20
    # Weight of each named loss of the model (e.g. {itc: 1, itm: 0.5}); a loss not listed weighs 1.
    objectives: dict[str, float] = field(default_factory=dict)
    progress: bool = True


@dataclass
class ParallelConfig:
    """How the model is spread over processes (graft/trainer/parallel.py); the same recipe runs as one
    process or under torchrun on any number of them."""
    # auto: ddp under torchrun, none as one process | none | ddp | fsdp2 (shard parameters, gradients
    # and optimizer state over the processes: FSDP2 fully_shard on each block, then the root)
    kind: str = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    # torch.compile the training forward: whole (one process, DDP) or each block (FSDP2), with
    # compile_backend: inductor (kernels), aot_eager (traced, run by eager ops: to tell a numerics or
    # kernel problem from a tracing one, as torchtitan's compile.backend does) or eager (dynamo only)
    compile: bool = False
    compile_backend: str = "inductor"
    # Seconds a collective may wait before the run fails naming the rank and the operation.
    timeout_s: int = 600


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["test", "compositional"])
    vqa_per_type: int = 300  # questions per question type and split (±3 points at 50 %, one s.e.)
    captions: int = 100  # images captioned per split (CIDEr)
    # In context (tasks `fewshot`, `documents`: eval/fewshot.py): solved examples before each query,
    # and interleaved documents of doc_images images whose cross-image questions are asked
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    documents: int = 100
    doc_images: int = 3
    batch_size: int = 128
    max_new_tokens: int = 24
    # Dual encoders (model=dual): zero-shot classification and image↔text retrieval.
    zeroshot_images: int = 1000  # single-object images per split, labelled with their colour x shape
    zeroshot_file: str | None = None  # YAML/JSON with `classes` and/or `templates` (default: the world's)
    zeroshot_prompt: str | None = None  # VLMs: the question class names answer (default: data.caption_prompt)
    retrieval_pairs: int = 1000  # image–caption pairs per split
    # models with image–text matching (contrastive.itm_layers > 0, qformer_stage1): also retrieve with each
    # query's contrastive top K re-ranked by the match probability (BLIP); 0 = off
    itm_rerank: int = 0
    # Tasks on a user's data (eval/tasks.py), `TASK=PATH` each, e.g. ["zeroshot=/data/pets"]: run at
    # the end of training, every train.eval_every steps, and by `graft eval RUN`.
    tasks: list[str] = field(default_factory=list)
    image_root: str | None = None  # image files named in a task's JSON/TSV (default: the file's own folder)
    # `graft eval RUN --task vqa --data PATH` on a user's questions (eval/questions.py)
    vqa_prompt: str = "{question}"  # open questions
    mc_prompt: str = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
    # VQAv2 (eval/vqav2.py): the annotations JSON (human answers) for the questions in --data;
    # None: the one *annotations*.json beside the questions file
    vqa_annotations: str | None = None
    # The training objective on this many steps of unseen records (the built-in world's val split, made
    # into rows as training makes them): `heldout_loss` at the end of training, the loss `graft scale
    # sweep` fits (trainer/heldout.py). 0 = off.
    heldout_batches: int = 0


# The sections only some designs read (the text tower, the contrastive loss, the Q-Former, Flamingo's
# blocks, EVE, distillation): each design's module registers its own (designs/registry.py), so that
# adding a design does not touch this file. They are read, set (`--set flamingo.every=2`), saved
# and loaded like the fields of `Config`.
SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> None:
    """Add a design's config section `name` (a dataclass); a name is one section."""
    if SECTIONS.get(name, cls) is not cls or name in _FIELDS:
        raise ValueError(f"config section {name!r} is registered twice")
    SECTIONS[name] = cls


@dataclass
class Config:
    name: str = "shapes_vqa"
    model: str = "vlm"  # vlm | dual (contrastive: CLIP, SigLIP, CLIPPO, LiT) | qformer_stage1 (BLIP-2 stage 1) | flamingo | fuyu
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # the designs' own sections (SECTIONS), by name: read as `cfg.<name>`
    sections: dict = field(default_factory=lambda: {name: cls() for name, cls in SECTIONS.items()}, repr=False)

    def __getattr__(self, name: str):
        """A design's section; one registered after this config was made starts at its defaults."""
        if name in SECTIONS:
            return self.__dict__.setdefault("sections", {}).setdefault(name, SECTIONS[name]())
        raise AttributeError(f"'Config' object has no attribute {name!r}")


_FIELDS = {f.name for f in dataclasses.fields(Config)}


# ---- conversion between values and typed fields -------------------------------------------------


def _field_types(obj) -> dict:
    """The settable keys of a config node and their types (at the top: the sections too)."""
    hints = typing.get_type_hints(type(obj))
    if isinstance(obj, Config):
        del hints["sections"]
        hints |= SECTIONS
    return {key_of(name): tp for name, tp in hints.items()}


def set_key(cfg: Config, dotted: str, raw) -> None:
    """Set one field by its dotted name, e.g. set_key(cfg, "lm.layers", "8")."""
    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        hints = _field_types(node)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            valid = ", ".join(sorted(hints))
            raise UserError(f"unknown config key '{dotted}' ('{part}' is not in {where}; valid: {valid})")
        if i < len(parts) - 1:
            node = getattr(node, field_of(part))
            if not dataclasses.is_dataclass(node):
                raise UserError(f"unknown config key '{dotted}' ('{part}' has no sub-keys)")
        elif dataclasses.is_dataclass(getattr(node, field_of(part))):
            raise UserError(f"config key '{dotted}' is a section; set one of its keys instead")
        else:
            setattr(node, field_of(part), coerce(dotted, raw, hints[part]))


def override(cfg: Config, overrides: list[str]) -> list[str]:
    """Apply `--set key=value` strings (the value is read as YAML, so 1e-3, true, [a, b] work), with
    types checked but no cross-field validation (config_checks.apply_overrides adds it); returns
    the keys set."""
    keys = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        keys.append(key.strip())
        set_key(cfg, keys[-1], text if _expects_str(cfg, keys[-1]) else value)
    return keys


def _expects_str(cfg: Config, dotted: str) -> bool:
    """Strings are taken verbatim (so `--set name=007` stays '007')."""
    node, parts = cfg, dotted.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if node is None or not dataclasses.is_dataclass(node):
            return False
    tp = _field_types(node).get(parts[-1])
    return tp is str


def to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    del out["sections"]
    return keyed(out | {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS})


def from_dict(data: dict, cls=Config, prefix: str = ""):
    """Build a config from a (YAML) dict, strictly: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping")
    obj = cls()
    hints = _field_types(obj)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise UserError(f"unknown config key '{dotted}' (valid: {', '.join(sorted(hints))})")
        if key in SECTIONS and isinstance(obj, Config):
            obj.sections[key] = from_dict(value, hints[key], dotted + ".")
        elif dataclasses.is_dataclass(hints[key]):
            setattr(obj, key, from_dict(value, hints[key], dotted + "."))
        else:
            setattr(obj, field_of(key), coerce(dotted, value, hints[key]))
    return obj


def save(cfg: Config, path: Path) -> None:
    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read(path: Path) -> Config:
    """A config file, parsed and type-checked (config_checks.load also validates it)."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(data or {})
