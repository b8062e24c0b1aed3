"""One assembly path: tokenizer → resolved config → model → initialised parts → surgery → frozen parts.

Training (trainer/loop.py), loading a run (`RunDir.load`), `graft data check` and `graft data show`
all come through here, so they see the same tokenizer, chat layout and architecture. Nothing here
changes the config it is given: `resolve` returns a resolved copy.

- `tokenizer_for(cfg, run)`: the run's own; else the HF LM's (`lm.hf_path`); else
  `data.tokenizer`; else `train.init_from`'s; else the source's (`SourceKind.tokenizer`: the built-in
  world's own, or one trained on the first records).
- `resolve(cfg, tok)`: the tower architecture of `vision.init_from`, the HF folders'
  architectures, the vocabulary sizes — what `config.yaml` then records.
- `assemble(cfg, tok)`: the design's model (graft/designs/), initialised from `train.init_from`
  (a graft run or an exported HF LLaVA folder), `vision.init_from` (a tower),
  `connector.init_from` (a Q-Former stage-1 run's tower and Q-Former, models/blip2.py) and
  `train.init_parts` (any part from any run, e.g. the connector of a stage-1 run; the LM and the
  tower may also come from HF folders, `lm.hf_path` / `vision.hf_path`), LoRA adapters added
  (`lm.lora_rank`), `train.freeze` applied.
- `step_losses(cfg, model, tok)`: the model's losses with the design's objectives and frozen teacher.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from graft.config import Config
from graft.config_checks import validate
from graft.data.hf_tokenizer import HFChatTokenizer
from graft.data.loader import IndexedBatches, StreamBatches
from graft.data.sources import build_sources, source_kind
from graft.data.stream import IndexedStream
from graft.data.tokenizer import ChatTokenizer
from graft.designs import design, uses_packing
from graft.errors import UserError
from graft.models.hf_backbones import resolve_lm, resolve_vision
from graft.models.lora import add_lora, merge_lora
from graft.objectives import StepLosses
from graft.parts import adopt_vision_arch, load_modules, load_stage1, load_vision
from graft.rundir import RunDir
from graft.trainer import checkpoint


def tokenizer_for(cfg: Config, run: RunDir | None = None):
    """The tokenizer a run of `cfg` trains with (its own, when `run` already has one)."""
    if run is not None and run.has_tokenizer():
        return run.tokenizer()
    if cfg.lm.hf_path:
        return HFChatTokenizer.load(cfg.lm.hf_path, key="lm.hf_path")
    if cfg.data.tokenizer:
        return ChatTokenizer.load(Path(cfg.data.tokenizer))
    src = Path(cfg.train.init_from) if cfg.train.init_from else None
    if src is not None and RunDir(src).has_tokenizer():
        return RunDir(src).tokenizer()
    if src is not None and (src / "tokenizer.json").is_file():  # an exported HF folder
        return ChatTokenizer.load(src / "tokenizer.json")
    return source_kind(cfg).tokenizer(cfg)  # the built-in world's own, or one trained on the first records


def resolve(cfg: Config, tok) -> tuple[Config, list[str]]:
    """A copy of `cfg` with every architecture and size that comes from elsewhere filled in, and
    the `vision.*` keys taken from `vision.init_from` (to tell the user)."""
    cfg = copy.deepcopy(cfg)
    changes = adopt_vision_arch(cfg) if cfg.vision.init_from else []
    cfg = resolve_backbones(cfg, tok)  # HF folders' architecture, so config.yaml says what trains
    if cfg.lm.vocab_size == 0:
        cfg.lm.vocab_size = len(tok)
    return cfg, changes


def resolve_backbones(cfg: Config, tok) -> Config:
    """Write the architecture of `vision.hf_path` / `lm.hf_path` folders into the config (in place)."""
    if cfg.vision.hf_path:
        cfg.vision = resolve_vision(cfg.vision)
    if cfg.lm.hf_path:
        cfg.lm = resolve_lm(cfg.lm, len(tok))
    return validate(cfg)  # e.g. vision.feature_layer against the tower's real depth


def build_model(cfg: Config, tok, pretrained: bool = True):
    """The model of `cfg`'s design (graft/designs/); HF backbones load their folder's weights
    unless pretrained=False."""
    return design(cfg.model).build(cfg, tok, pretrained)


def build_processor(cfg: Config, tok, model):
    """What turns records into the model's rows and batches, for `cfg`'s design."""
    return design(cfg.model).processor(cfg, tok, model)




def step_losses(cfg: Config, model, tok) -> StepLosses:
    """What a training step of `cfg` computes on `model`: its own losses, and its design's
    objectives with their frozen teacher (held here, outside the model: graft/objectives.py)."""
    entry = design(cfg.model)
    return StepLosses(model, entry.objectives(cfg, model), entry.teacher(cfg, model, tok), entry.train_inputs(cfg))


def load_run(run: RunDir):
    """A run's config (validated), tokenizer and model with its latest checkpoint's weights (eval
    mode, CPU)."""
    run.require()
    cfg, tok = validate(run.config(), sources=False), run.tokenizer()  # its weights are in its checkpoints
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise UserError(f"{run.path} has no complete checkpoint under checkpoints/")
    model = assemble(cfg, tok, init=False)  # every weight comes from the checkpoint
    checkpoint.load_weights(model, ckpt)
    return cfg, tok, model.eval(), ckpt


def assemble(cfg: Config, tok, init: bool = True):
    """The model of a resolved `cfg`: built, initialised (`init`: from HF folders and the
    `*.init_from` settings; else left for a checkpoint to fill), LoRA added, parts frozen."""
    model = build_model(cfg, tok, pretrained=init)
    if init and cfg.train.init_from:
        init_from(model, cfg.train.init_from)
    if init and cfg.vision.init_from:
        # A locked image head must be the run's too: a random projection, frozen, could not be learned around.
        load_vision(model, cfg.vision.init_from, image_head="image_head" in cfg.train.freeze)
    if init and cfg.connector.init_from:  # BLIP-2 stage 2: the stage-1 run's image encoder and Q-Former
        load_stage1(model, cfg.connector.init_from)
    for part, path in cfg.train.init_parts.items() if init else ():
        load_modules(model, model.part_modules(part), path, f"train.init_parts.{part}")
    if cfg.lm.lora_rank:  # after init_from, so a run without adapters can initialise one with them

        add_lora(model.lm, cfg.lm)
    model.freeze(cfg.train.freeze)
    return model


def init_from(model, path: str) -> None:
    """Weights from a graft run (LoRA merged) or an exported HF LLaVA folder (config.json)."""
    src = RunDir(path)
    if not src.config_path.is_file() and (Path(path) / "config.json").is_file():
        # lazy: imports transformers (~0.5 s), only for an exported HF LLaVA folder
        from graft.models.hf_llava import load_llava_weights

        load_llava_weights(model, path)
        return
    src.require()
    ckpt = src.latest_checkpoint()
    if ckpt is None:
        raise UserError(f"train.init_from: {path} has no complete checkpoint")
    if not src.config().lm.lora_rank:
        checkpoint.load_weights(model, ckpt)
        return

    with torch.random.fork_rng():  # building the source model must not move this run's RNG
        _, _, source, _ = load_run(src)
    merge_lora(source.lm)  # adapters folded in: the names are those of a model without LoRA
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise UserError(f"train.init_from: {path} does not fit this model ({str(e).splitlines()[1].strip()[:160]})") from None


def build_stream(cfg: Config, proc, rt, checkpoint: Path | None = None):
    """The trainer's micro-batch stream for this rank, resumed from `checkpoint`'s data position:
    an indexed source's by number (its position is the step), the others' from DataLoader workers.
    Every design reads every source the same way; the processor makes its rows and batches."""
    sources, weights = build_sources(cfg, proc)
    if source_kind(cfg).indexed:
        (source,) = sources
        return IndexedBatches(IndexedStream(source, proc, cfg, rt.rank, rt.world_size, packs=uses_packing(cfg)), cfg)
    saved = json.loads((checkpoint / "meta.json").read_text()).get("data") if checkpoint else None
    return StreamBatches(cfg, proc, sources, weights, rt.rank, rt.world_size, saved)


def processor_for(cfg: Config):
    """The processor a run of `cfg` would train with — its tokenizer, chat layout and placeholders —
    without allocating the model (built on the meta device)."""
    tok = tokenizer_for(cfg)
    resolved, _ = resolve(cfg, tok)
    with torch.device("meta"):
        model = build_model(resolved, tok, pretrained=False)
    return build_processor(resolved, tok, model)
