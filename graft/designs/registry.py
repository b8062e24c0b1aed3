"""The registry of designs: what each design promises (`Design`), the capabilities a design may
have, and the lookups the rest of graft makes. Each design registers itself from its own module
(graft/designs/*.py); graft/designs/__init__.py imports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from graft import config
from graft.data.sources import source_kind
from graft.errors import UserError
from graft.models.modality import IMAGES

SHARED_SECTIONS = ("name", "model", "data", "optim", "train", "eval")
GENERATES = "generates"  # answers in text, from images and a prompt
EMBEDS = "embeds"  # images and texts into one space
CAPTIONS = "captions"  # writes an image's caption with no prompt (CoCa); beside EMBEDS it is scored on both
CAPABILITIES = {GENERATES: "a run that generates text (a VLM)", CAPTIONS: "a run that captions images (coca)",
                EMBEDS: "a run that embeds images and texts (clip, "
                "siglip, clippo, lit, qformer_stage1)"}


@dataclass(frozen=True)
class Design:
    capabilities: frozenset[str]
    sections: tuple[str, ...]
    parts: tuple[str, ...]
    build: Callable
    processor: Callable
    tokens: Callable
    validate: Callable
    losses: tuple[str, ...] = ()  # the named losses its model returns (`train.objectives` weighs them)
    packs: bool = False  # its batches of an indexed source can pack conversations into rows (data/packing.py)
    sources: Callable = lambda cfg: None  # checks of the runs it initialises from (before training, not on load)
    exports_llava: bool = False  # `graft export --format hf` can write it as HF LLaVA
    # the named losses its model returns besides `losses` under this config (an MoE LM's balancing
    # loss, Fuyu's alignment to a teacher)
    config_losses: Callable = lambda cfg: ()
    # what the trainer adds beside the model's own losses (graft/objectives.py): a frozen teacher it
    # holds outside the model, `(cfg, model, tok) → Teacher | None`, and named objectives over the
    # model's outputs, the batch and the teacher's, `(cfg, model) → {name: Objective}`
    teacher: Callable = lambda cfg, model, tok: None
    objectives: Callable = lambda cfg, model: {}
    # keyword arguments its model's forward takes in training besides the batch (the VLMs' LM head
    # only at answer positions, `answers_only`, while no objective reads their logits)
    train_inputs: Callable = lambda cfg: {}
    # the config sections it brings (name → dataclass), registered into the config with it
    # (config.SECTIONS: `cfg.<name>`, `--set <name>.<key>=...`); `sections` names them among what it reads
    config_sections: dict = field(default_factory=dict)
    # the modalities of the items it reads besides text (models/modality.py; a source says its own)
    modalities: frozenset[str] = frozenset({IMAGES.name})

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


DESIGNS: dict[str, Design] = {}


def register(name: str, entry: Design) -> Design:
    """Add a design under `name` (`model: NAME` picks it); a name is registered once."""
    if name in DESIGNS:
        raise ValueError(f"design {name!r} is registered twice")
    unknown = entry.capabilities - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"design {name!r}: unknown capabilities {sorted(unknown)}")
    missing = set(entry.config_sections) - set(entry.sections)
    if missing:
        raise ValueError(f"design {name!r}: its config sections {sorted(missing)} are not among those it reads")
    for section, cls in entry.config_sections.items():
        config.register_section(section, cls)
    DESIGNS[name] = entry
    return entry


def design(name: str) -> Design:
    if name not in DESIGNS:
        raise UserError(f"model={name!r} is not one of {', '.join(DESIGNS)}")
    return DESIGNS[name]


def model_sections() -> tuple[str, ...]:
    """Every config section some design reads, besides the shared ones, in registration order."""
    return tuple(dict.fromkeys(s for d in DESIGNS.values() for s in d.sections))


def can_pack(cfg) -> bool:
    """Packing (data/packing.py) needs an indexed source (the built-in world), a design that packs
    and the built-in LM's document mask."""
    return source_kind(cfg).indexed and design(cfg.model).packs and not cfg.lm.hf_path


def uses_packing(cfg) -> bool:
    """data.pack, or where unset, whether this run can pack."""
    return can_pack(cfg) if cfg.data.pack is None else cfg.data.pack
