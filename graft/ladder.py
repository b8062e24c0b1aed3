"""Size ladders for `graft scale sweep`: a recipe's model at other sizes, each a valid shape.

A size is a parameter count (`300k`, `1.5M`, `2e6`: the ladder picks the width whose model comes
closest, counted with embeddings) or an LM shape `WIDTHxDEPTH` (`96x2`). Every size keeps the
recipe's proportions, so that one number moves along the ladder:

- the LM keeps its head width (hidden_size / heads) and its query heads per KV head, so a width
  is a multiple of head width x group (64 for the built-in recipes: 32-wide heads, 2 per KV head);
  its MLP keeps intermediate_size / hidden_size, and its depth keeps hidden_size / layers
  (rounded, at least 1): shapes_vqa's 128 x 3 gives 64 x 2, 192 x 4, 256 x 6;
- the vision tower, where the design has one (`vision` among its parts), scales its width by the
  LM's factor in whole heads of its own head width, and its depth and MLP in the same proportions;
  the image and patch sizes stay (the world's images are what they are), so does every other
  section (connector kind, Q-Former, Flamingo blocks);
- N is counted on the meta device from the real model (graft/plan.py `counts`, tied weights once),
  with and without embeddings: `non_embedding` leaves out every nn.Embedding (the token table, and
  with it a tied LM head) — Kaplan et al.'s N; the fit reads the total, Chinchilla's.

The recipe's own architecture must be graft's built-in LM and ViT trained from scratch: an HF
folder or `*.init_from` fixes the shape, and is refused with one line.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from graft.build import assemble, resolve, tokenizer_for
from graft.config import Config
from graft.config_checks import apply_overrides
from graft.data.sources import source_kind
from graft.designs import design
from graft.errors import UserError
from graft.models.modality import IMAGES
from graft.plan import counts

MAX_MULTIPLE = 64  # the widest LM a parameter target may pick: 64 x the width unit


@dataclass(frozen=True)
class Size:
    name: str  # what run folders are called: d<width>L<depth>
    sets: tuple[str, ...]  # the --set keys that make the recipe this size
    params: int  # every parameter, tied weights once
    non_embedding: int  # without nn.Embedding tables


def check_scalable(cfg: Config) -> None:
    """One line when the recipe's shape is not graft's to choose."""
    entry = design(cfg.model)
    if "lm" not in entry.parts:
        raise UserError(f"graft scale sweep: model={cfg.model} has no LM to scale (the ladder scales VLMs: lm.* and vision.*)")
    if source_kind(cfg).modality is not IMAGES:
        raise UserError(f"graft scale sweep: data.source={cfg.data.source} reads series; the ladder scales image "
                        "towers only (not yet the series tower)")
    for key, value in (("lm.hf_path", cfg.lm.hf_path), ("vision.hf_path", cfg.vision.hf_path),
                       ("vision.init_from", cfg.vision.init_from), ("train.init_from", cfg.train.init_from)):
        if value:
            raise UserError(f"graft scale sweep: {key}={value} fixes the model's shape; the ladder trains graft's "
                            "built-in LM and ViT from scratch")


def ladder(cfg: Config, specs: list[str]) -> list[Size]:
    """The sizes `specs` name, smallest first; two specs that give one shape are an error."""
    check_scalable(cfg)
    if not specs:
        raise UserError("graft scale sweep: --sizes names no size (e.g. --sizes 200k 500k 1M or 64x2 128x3)")
    unit = _unit(cfg)
    cache: dict[tuple[int, int | None], Size] = {}

    def at(width: int, depth: int | None = None) -> Size:
        if (width, depth) not in cache:
            cache[width, depth] = _size(cfg, width, depth)
        return cache[width, depth]

    sizes = {}
    for spec in specs:
        shape = re.fullmatch(r"(\d+)x(\d+)", spec)
        if shape:
            width, depth = int(shape[1]), int(shape[2])
            if width % unit or depth < 1:
                raise UserError(f"--sizes {spec}: the LM width must be a multiple of {unit} (whole KV groups of "
                                f"{cfg.lm.hidden_size // cfg.lm.heads}-wide heads) and the depth at least 1")
            size = at(width, depth)
        else:
            size = _nearest(lambda k: at(unit * k), parse_count(spec))
        if size.name in sizes:
            raise UserError(f"--sizes {sizes[size.name][0]} and {spec} both give {size.name} ({size.params:,} parameters)")
        sizes[size.name] = (spec, size)
    return sorted((s for _, s in sizes.values()), key=lambda s: s.params)


def _nearest(at, target: float) -> Size:
    """The size among `at(1)` … `at(MAX_MULTIPLE)` whose count is nearest `target` on a log scale.
    Counts grow with the multiple (depth and tower follow the width), so the nearest is one of the
    two around the first multiple reaching `target`: found by doubling then bisection, which builds
    a dozen models instead of all 64 (the largest, 4,096 wide, take seconds even on the meta device)."""
    hi = 1
    while hi < MAX_MULTIPLE and at(hi).params < target:
        hi = min(2 * hi, MAX_MULTIPLE)
    lo = hi // 2  # at(lo) < target <= at(hi), or hi is an end of the range
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid).params < target else (lo, mid)
    return min((at(k) for k in (lo, hi) if k >= 1), key=lambda s: abs(math.log(s.params / target)))


def parse_count(spec: str) -> float:
    """`300k`, `1.5M`, `2e6` → a number of parameters."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kKmMgG]?)", spec)
    if not m or float(m[1]) <= 0:
        raise UserError(f"--sizes {spec}: not a parameter count (300k, 1.5M, 2e6) or an LM shape WIDTHxDEPTH (96x2)")
    return float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2].lower()]


def _unit(cfg: Config) -> int:
    lm = cfg.lm
    return (lm.hidden_size // lm.heads) * (lm.heads // lm.kv_heads)


def shape_sets(cfg: Config, width: int, depth: int | None = None) -> list[str]:
    """The --set keys of the LM at `width` (and `depth`, else the recipe's aspect ratio) with the
    vision tower scaled alike."""
    lm = cfg.lm
    head, group = lm.hidden_size // lm.heads, lm.heads // lm.kv_heads
    depth = depth or max(1, round(width * lm.layers / lm.hidden_size))
    heads = width // head
    sets = [f"lm.hidden_size={width}", f"lm.layers={depth}", f"lm.heads={heads}", f"lm.kv_heads={heads // group}",
            f"lm.intermediate_size={round(width * lm.intermediate_size / lm.hidden_size)}"]
    if "vision" in design(cfg.model).parts:
        v = cfg.vision
        v_head = v.hidden_size // v.heads
        v_width = max(1, round(v.hidden_size * width / lm.hidden_size / v_head)) * v_head
        sets += [f"vision.hidden_size={v_width}", f"vision.heads={v_width // v_head}",
                 f"vision.layers={max(1, round(v_width * v.layers / v.hidden_size))}",
                 f"vision.intermediate_size={round(v_width * v.intermediate_size / v.hidden_size)}"]
    return sets


def _size(cfg: Config, width: int, depth: int | None) -> Size:
    sets = shape_sets(cfg, width, depth)
    sized = apply_overrides(copy.deepcopy(cfg), sets)
    tok = tokenizer_for(sized)
    resolved, _ = resolve(sized, tok)
    with torch.device("meta"):
        model = assemble(resolved, tok, init=False)
    total = counts(model, ())["total"][0]
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return Size(f"d{width}L{resolved.lm.layers}", tuple(sets), total, total - embedding)

