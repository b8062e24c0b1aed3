"""The registry of designs: the ways a model is made to see. `model: NAME` in a config picks one.

A `Design` states everything the rest of graft asks of it, so that no other file decides by the
design's name or the model's type:

- `capabilities`: what its models can do, which decides what evaluation, `data show`, generation
  and export ask of them — GENERATES (answers in text from images and a prompt: VQA, captions,
  class-name likelihoods) and EMBEDS (embeds images and texts in one space: zero-shot by
  similarity, retrieval). A design may have both; each task scores with the first of its scorers
  whose capability the design has (eval/tasks.py).
- `sections`: the config sections it reads besides the shared ones (name, model, data, optim,
  train, eval); `--set` on a model section it does not read is an error (config_checks.py).
- `parts`: the module names `train.freeze` may list.
- `build(cfg, tok, pretrained)` → the model; `processor(cfg, tok, model)` → what turns records
  into rows (and how many placeholders an image gets); `world_batches(cfg, proc, rt)` → the
  trainer's micro-batches from the built-in world; `tokens(batch, pad)` → the text tokens of a
  micro-batch, for throughput; `validate(cfg)` → design-specific config checks. (FLOPs need no
  entry: the trainer counts them on the real forward and backward, train/flops.py.)
- `losses`: the names of the losses its model returns; `train.objectives` may weigh them. The
  model's `forward(**batch)` returns (output, {name: local sum}) and `loss_counts(**batch)` what
  each sum is over (graft/losses.py). `packs`: its world batches can pack several conversations
  into one row (with the built-in LM). `exports_llava`: `graft export` can write it as HF LLaVA.

A new design is one entry here (and its model file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from graft.errors import UserError
from graft.models.connectors import per_patch
from graft.models.dual_encoder import PARTS as DUAL_PARTS

SHARED_SECTIONS = ("name", "model", "data", "optim", "train", "eval")
GENERATES = "generates"  # answers in text, from images and a prompt
EMBEDS = "embeds"  # images and texts into one space
CAPABILITIES = {GENERATES: "a run that generates text (a VLM)", EMBEDS: "a run that embeds images and texts (clip, "
                "siglip, clippo, lit, qformer_stage1)"}


@dataclass(frozen=True)
class Design:
    capabilities: frozenset[str]
    sections: tuple[str, ...]
    parts: tuple[str, ...]
    build: Callable
    processor: Callable
    world_batches: Callable
    tokens: Callable
    validate: Callable
    losses: tuple[str, ...] = ()  # the named losses its model returns (`train.objectives` weighs them)
    packs: bool = False  # its world batches can pack conversations into rows (data/packing.py)
    sources: Callable = lambda cfg: None  # checks of the runs it initialises from (before training, not on load)
    exports_llava: bool = False  # `graft export --format hf` can write it as HF LLaVA
    # the named losses its model returns besides `losses` under this config (an MoE LM's balancing
    # loss, Fuyu's alignment to a teacher)
    config_losses: Callable = lambda cfg: ()

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


# ---- prefix fusion (LLaVA): vision → connector → image tokens spliced into the LM's input --------


def _build_vlm(cfg, tok, pretrained: bool = True):
    from graft.models.hf_backbones import HFLanguageModel, HFVisionTower
    from graft.models.vlm import VLM

    _resolve_vocab(cfg, tok)
    vision = HFVisionTower.load(cfg.vision, pretrained) if cfg.vision.hf_path else cfg.vision
    lm = HFLanguageModel.load(cfg.lm, pretrained) if cfg.lm.hf_module else _builtin_lm(cfg.lm, pretrained)
    return VLM(vision, cfg.connector, lm, tok.image)


def _lm_losses(cfg) -> tuple[str, ...]:
    """The built-in LM's auxiliary losses under `cfg` (LanguageModel.aux_losses)."""
    return ("moe_balance",) if cfg.lm.moe_experts and cfg.lm.moe_balance == "loss" else ()


def _builtin_lm(lm, pretrained: bool):
    """The built-in decoder's config, or with lm.hf_path (lm.builtin) the decoder with the folder's weights."""
    if not lm.hf_path:
        return lm
    from graft.models.hf_backbones import load_into_builtin

    return load_into_builtin(lm, pretrained)


def _resolve_vocab(cfg, tok) -> None:
    if cfg.lm.vocab_size == 0:
        cfg.lm.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.lm.vocab_size < len(tok):
        raise UserError(f"lm.vocab_size={cfg.lm.vocab_size} is smaller than the tokenizer's {len(tok)}")


def _vlm_processor(cfg, tok, model):
    from graft.data.hf_tokenizer import HFChatTokenizer, TemplateProcessor
    from graft.data.processor import Processor

    v = cfg.vision
    cls = TemplateProcessor if isinstance(tok, HFChatTokenizer) else Processor
    return cls(tok, v.image_size, model.num_image_tokens, cfg.lm.max_seq_len, v.image_mean, v.image_std)


def _vlm_world(cfg, proc, rt):
    from graft.data.loader import ShapesBatches
    from graft.data.stream import TrainStream

    return ShapesBatches(TrainStream(cfg, proc, rt.rank, rt.world_size, packs=uses_packing(cfg)), cfg)


def _vlm_tokens(batch, pad: int) -> int:
    return int((batch["input_ids"] != pad).sum())


def _validate_vlm(cfg) -> None:
    from graft.models.connectors import CONNECTORS, ConnectorConfig
    from graft.models.decoder import LMConfig

    parts = [p for p in DESIGNS["vlm"].parts if p != "lm_image" or cfg.lm.modality_norms or cfg.lm.modality_ffn]
    if "lm_image" in cfg.train.freeze and "lm_image" not in parts:
        raise UserError("train.freeze: lm_image: this model has none (see lm.modality_norms, lm.modality_ffn)")
    if set(parts) <= set(cfg.train.freeze):
        raise UserError(f"train.freeze freezes every part ({', '.join(parts)}): nothing would train")
    v = cfg.vision  # the built-in tower's grid and LM's width (HF ones are checked when the model is built)
    ConnectorConfig.check(cfg.connector, None if v.hf_path else (v.image_size // v.patch_size) ** 2,
                          None if cfg.lm.hf_module else cfg.lm.hidden_size)
    LMConfig.check(cfg.lm, image_grid=CONNECTORS[cfg.connector.kind].grid)
    _validate_vision(cfg)


def _validate_vision(cfg) -> None:
    """The built-in tower's settings (shared by every design with a ViT)."""
    from graft.models.vit import VisionConfig

    VisionConfig.check(cfg.vision)
    if cfg.vision.position_init_std != 0.02 and (cfg.train.init_from or "vision" in cfg.train.init_parts):
        raise UserError(f"vision.position_init_std={cfg.vision.position_init_std} has no effect: the tower's weights "
                        "come from train.init_from / train.init_parts")


# ---- Flamingo: gated cross-attention blocks between the LM's layers read the images --------------


def _build_flamingo(cfg, tok, pretrained: bool = True):
    from graft.models.flamingo import Flamingo
    from graft.models.hf_backbones import HFVisionTower

    _resolve_vocab(cfg, tok)
    vision = HFVisionTower.load(cfg.vision, pretrained) if cfg.vision.hf_path else cfg.vision
    return Flamingo(vision, cfg.connector, _builtin_lm(cfg.lm, pretrained), tok.image, cfg.flamingo)


def _validate_flamingo(cfg) -> None:
    from graft.models.flamingo import FlamingoConfig

    if cfg.lm.hf_module:
        raise UserError("model=flamingo needs the built-in decoder: with lm.hf_path, set lm.builtin=true")
    for key in ("image_attention", "image_positions", "modality_norms", "modality_ffn"):
        if getattr(cfg.lm, key) != getattr(type(cfg.lm)(), key):
            raise UserError(f"lm.{key} has no effect with model=flamingo: images do not enter the LM's sequence")
    FlamingoConfig.check(cfg.flamingo, cfg.lm.layers)
    if set(DESIGNS["flamingo"].parts) <= set(cfg.train.freeze):
        raise UserError(f"train.freeze freezes every part ({', '.join(DESIGNS['flamingo'].parts)}): nothing would train")
    v = cfg.vision
    from graft.models.connectors import ConnectorConfig

    ConnectorConfig.check(cfg.connector, None if v.hf_path else (v.image_size // v.patch_size) ** 2, cfg.lm.hidden_size)
    _validate_vision(cfg)


# ---- Fuyu: no vision encoder, raw patches → one linear map → the LM ------------------------------


def _build_fuyu(cfg, tok, pretrained: bool = True):
    from graft.models.fuyu import AlignedFuyu, Patches
    from graft.parts import load_teacher
    from graft.models.vlm import VLM

    _resolve_vocab(cfg, tok)
    if cfg.eve.teacher:  # EVE: the LM is taught a frozen tower's features of its patches
        return AlignedFuyu(cfg.vision, cfg.connector, _builtin_lm(cfg.lm, pretrained), tok.image,
                           load_teacher(cfg.eve.teacher), cfg.eve.layer)
    return VLM(Patches(cfg.vision), cfg.connector, _builtin_lm(cfg.lm, pretrained), tok.image)


def _fuyu_processor(cfg, tok, model):
    from graft.data.processor import Processor

    v = cfg.vision
    return Processor(tok, v.image_size, model.num_image_tokens, cfg.lm.max_seq_len, v.image_mean, v.image_std,
                     image_row=v.image_size // v.patch_size)


def _validate_fuyu(cfg) -> None:
    from graft.models.decoder import LMConfig
    from graft.models.fuyu import READS
    from graft.models.vit import VisionConfig

    defaults = VisionConfig()
    for key in (f.name for f in dataclasses.fields(VisionConfig) if f.name not in READS):
        if getattr(cfg.vision, key) != getattr(defaults, key):
            raise UserError(f"vision.{key} has no effect with model=fuyu: it has no vision encoder "
                            f"(it reads vision.{', vision.'.join(READS)})")
    if not per_patch(cfg.connector.kind):
        raise UserError(f"connector.kind={cfg.connector.kind}: model=fuyu projects each raw patch (linear or mlp)")
    if cfg.lm.hf_module:
        raise UserError("model=fuyu needs the built-in decoder: with lm.hf_path, set lm.builtin=true")
    for key in ("image_attention", "image_positions"):
        if getattr(cfg.lm, key) != getattr(LMConfig(), key):
            raise UserError(f"lm.{key} needs each image as one run of tokens; model=fuyu ends every row with a newline")
    if cfg.vision.image_size % cfg.vision.patch_size:
        raise UserError(f"vision.image_size={cfg.vision.image_size} is not a multiple of vision.patch_size={cfg.vision.patch_size}")
    from graft.models.fuyu import EveConfig

    EveConfig.check(cfg.eve, cfg.lm.layers)
    if set(DESIGNS["fuyu"].parts[:2]) <= set(cfg.train.freeze):
        raise UserError("train.freeze freezes every part (connector, lm): nothing would train")


# ---- dual encoders (CLIP, SigLIP, CLIPPO, LiT): image and text towers, a contrastive loss -----


def _build_dual(cfg, tok, pretrained: bool = True):
    from graft.models.dual_encoder import DualEncoder

    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.text.vocab_size < len(tok):
        raise UserError(f"text.vocab_size={cfg.text.vocab_size} is smaller than the tokenizer's {len(tok)}")
    return DualEncoder(cfg.vision, cfg.text, cfg.contrastive, tok.eos)


def _dual_processor(cfg, tok, model):
    from graft.data.contrastive import ContrastiveProcessor

    c = cfg.contrastive
    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.text.max_len, c.shared_tower, c.render_font_size)


def _dual_world(cfg, proc, rt):
    from graft.data.contrastive import ContrastiveStream
    from graft.data.loader import PureBatches
    from graft.data.stream import make_world

    t = cfg.train
    return PureBatches(ContrastiveStream(make_world(cfg), proc, t.batch_size, t.grad_accum, rt.rank, rt.world_size))


def _dual_tokens(batch, pad: int) -> int:
    ids = batch.get("input_ids")  # CLIPPO batches carry rendered text, no token ids
    return 0 if ids is None else int((ids != pad).sum())


def _validate_dual(cfg) -> None:
    from graft.models.dual_encoder import ContrastiveConfig
    from graft.models.text_encoder import TextConfig

    TextConfig.check(cfg.text)
    ContrastiveConfig.check(cfg.contrastive)
    _validate_vision(cfg)
    if cfg.contrastive.shared_tower and "text" in cfg.train.freeze:
        raise UserError("train.freeze: 'text' has no tower of its own when contrastive.shared_tower=true (CLIPPO)")


# ---- BLIP-2 stage 1 (Q-Former): queries learn to read the image encoder, ITC + ITM + ITG ----------
# Stage 2 is the `vlm` design with `connector.kind=qformer` and `connector.init_from=STAGE1_RUN`.

QFORMER_STAGE1 = "qformer_stage1"


def _build_qformer_stage1(cfg, tok, pretrained: bool = True):
    from graft.models.blip2 import QFormerStage1
    from graft.models.hf_backbones import HFVisionTower

    vision = HFVisionTower.load(cfg.vision, pretrained) if cfg.vision.hf_path else cfg.vision
    return QFormerStage1(vision, cfg.qformer, len(tok), tok.pad)


def _qformer_processor(cfg, tok, model):
    from graft.data.contrastive import ContrastiveProcessor

    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.qformer.max_text_len)


def _validate_qformer_stage1(cfg) -> None:
    from graft.models.blip2 import PARTS
    from graft.models.qformer import QFormerConfig

    QFormerConfig.check(cfg.qformer)
    if set(PARTS) <= set(cfg.train.freeze):
        raise UserError(f"train.freeze freezes every part ({', '.join(PARTS)}): nothing would train")
    if cfg.train.batch_size // cfg.train.grad_accum < 2:
        raise UserError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} "
                        "gives micro-batches of one pair: ITM draws its negatives from the micro-batch (need ≥ 2)")
    _validate_vision(cfg)


def _check_stage1_run(cfg) -> None:
    """`connector.init_from`, when set, names a finished stage-1 Q-Former run with this config's
    Q-Former and image-encoder architecture (its tower comes with its Q-Former: the queries read
    its features)."""
    path, key = cfg.connector.init_from, "connector.init_from"
    if not path:
        return
    from pathlib import Path

    from graft.models.qformer import QFormerConfig
    from graft.parts import VISION_ARCH
    from graft.rundir import RunDir

    run = RunDir(path)
    if not run.config_path.is_file():
        raise UserError(f"{key}={path} is not a graft run directory (no config.yaml)")
    src = run.config()
    if src.model != QFORMER_STAGE1:
        raise UserError(f"{key}={path} is a model={src.model} run, not a Q-Former stage-1 run (model={QFORMER_STAGE1})")
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


VLM, DUAL = frozenset({GENERATES}), frozenset({EMBEDS})
DESIGNS = {
    "vlm": Design(VLM, ("vision", "connector", "lm"), ("vision", "connector", "lm", "lm_image"), _build_vlm,
                  _vlm_processor, _vlm_world, _vlm_tokens, _validate_vlm, losses=("lm",), packs=True,
                  sources=_check_stage1_run, exports_llava=True, config_losses=_lm_losses),
    "flamingo": Design(VLM, ("vision", "connector", "lm", "flamingo"), ("vision", "connector", "lm", "xattn"),
                       _build_flamingo, _vlm_processor, _vlm_world, _vlm_tokens, _validate_flamingo, losses=("lm",),
                       packs=True, config_losses=_lm_losses),
    "fuyu": Design(VLM, ("vision", "connector", "lm", "eve"), ("connector", "lm", "lm_image"), _build_fuyu,
                   _fuyu_processor, _vlm_world, _vlm_tokens, _validate_fuyu, losses=("lm",), packs=True,
                   config_losses=lambda cfg: _lm_losses(cfg) + (("align",) if cfg.eve.teacher else ())),
    "dual": Design(DUAL, ("vision", "text", "contrastive"), DUAL_PARTS,
                   _build_dual, _dual_processor, _dual_world, _dual_tokens, _validate_dual,
                   losses=("itc",)),
    QFORMER_STAGE1: Design(DUAL, ("vision", "qformer"), ("vision", "qformer", "heads"), _build_qformer_stage1,
                           _qformer_processor, _dual_world, _dual_tokens, _validate_qformer_stage1,
                           losses=("itc", "itm", "itg")),
}
MODEL_SECTIONS = tuple(dict.fromkeys(s for d in DESIGNS.values() for s in d.sections))


def design(name: str) -> Design:
    if name not in DESIGNS:
        raise UserError(f"model={name!r} is not one of {', '.join(DESIGNS)}")
    return DESIGNS[name]


def can_pack(cfg) -> bool:
    """Packing (data/packing.py) needs the built-in world's stream, a design that packs and the
    built-in LM's document mask."""
    return cfg.data.source == "shapes" and design(cfg.model).packs and not cfg.lm.hf_path


def uses_packing(cfg) -> bool:
    """data.pack, or where unset, whether this run can pack."""
    return can_pack(cfg) if cfg.data.pack is None else cfg.data.pack
