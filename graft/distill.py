"""Knowledge distillation of a dual encoder from frozen dual-encoder teachers (CLIP-KD, Yang et al.
2024): the config, the three losses, and the objectives a design hands the trainer.

Each teacher reads the student's pixels and token ids and gives its L2-normalised embeddings
t_img, t_txt (B, E_t) and its own logit scale t; the student gives s_img, s_txt (B, E_s) and its
logit scale s. Per teacher:

- `fd`  (feature distillation, CLIP-KD §3.2): Σ_i ||P s_img_i - t_img_i||² + ||P s_txt_i - t_txt_i||²,
  P a learned linear map E_s → E_t (the identity when the widths are equal);
- `icl` (interactive contrastive learning, §3.3): the student's images contrasted with the teacher's
  texts, and the student's texts with the teacher's images (InfoNCE, the student's scale);
- `crd` (contrastive relational distillation, §3.1): KL(p_teacher ‖ p_student) of each row's softmax
  over the batch of image–text similarities, both directions;
- `kd` (open_clip's logit distillation, `DistillClipLoss`): the soft cross-entropy of the student's
  logits s · s_img s_txtᵀ against the softmax of the teacher's t · t_img t_txtᵀ (its own scale),
  both directions;
- `dense` (RADIO's feature distillation, Ranzinger et al. 2024): the student's patch tokens through
  a per-teacher MLP head against the teacher's patch features (resized to the student's grid),
  cosine distance + smooth-L1, averaged over patches, summed over images.
- `masked` (masked image modelling with a teacher's features as targets: BEiT v2, EVA): each patch
  masked with probability `distill.mask_prob` (a learned mask vector read instead), the student's
  states at the masked patches through a per-teacher MLP head against the teacher's features of
  the *unmasked* image there, the same per-patch distance, summed over masked patches and counted
  over them.

The named losses `distill_fd`, `distill_icl`, `distill_crd`, `distill_kd`, `distill_dense`, `distill_masked` are the teacher-weighted sums
over teachers, as local sums over this process's pairs (counted like `itc`). Loading the teachers
and the student's projections is the dual design's (designs/dual.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from graft.errors import UserError
from graft.losses import (
    ce_rows,
    global_mean,
    local_and_gathered,
    as_local_sum,
    at_least_fp32,
)
from graft.models.mim import patch_mask
from graft.objectives import Objective

LOSSES = ("fd", "icl", "crd", "kd", "dense", "masked")
PATCH_LOSSES = ("dense", "masked")  # read the teachers' patch features
DEFAULT = ("fd", "icl", "crd")  # CLIP-KD's three


@dataclass
class DistillConfig:
    """Distillation from frozen teachers, read by the dual design (this module) and the vlm design
    (graft/distill_lm.py); each says which losses it has and which of them read the temperature."""

    # graft runs of the student's design (dual: or HF CLIP/SigLIP folders), each a path or
    # {from: PATH, weight: W}; empty = off
    teachers: list[str | dict[str, str]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # one per teacher, summing to 1; empty = the entries' or equal
    losses: list[str] = field(default_factory=list)  # empty = the design's default (dual: fd, icl, crd; vlm: logits); dual: kd, dense too
    temperature: float = 1.0  # dual's crd: the teacher's similarities / τ; dual's kd and vlm's logits: both models' / τ, × τ²
    layers: dict[int, int] = field(default_factory=dict)  # vlm's hidden: {student layer: teacher layer}, e.g. {-1: -1}
    mask_prob: float = 0.4  # dual's masked: the share of patches masked (BEiT v2 and EVA mask 40 %)
    # the soft/hard mix (config key `distill.lambda`): each distillation loss weighed λ, every other loss
    # of the run 1 - λ, on top of train.objectives; None = train.objectives alone
    lambda_: float | None = None
    # a folder of the teachers' outputs written by `graft distill precompute` (graft/teacher_store.py),
    # read by record instead of running the teachers; dual encoders
    precomputed: str | None = None

    @property
    def paths(self) -> list[str]:
        """Each teacher's run directory or folder."""
        return [t if isinstance(t, str) else t.get("from", "") for t in self.teachers]

    def chosen(self, default: tuple[str, ...]) -> list[str]:
        return list(self.losses) or list(default)

    @staticmethod
    def check(cfg: DistillConfig, losses: tuple[str, ...] = LOSSES, default: tuple[str, ...] = DEFAULT,
              temperature_read_by: tuple[str, ...] = ("crd", "kd")) -> None:
        if not cfg.teachers:
            for key in ("weights", "losses", "temperature", "layers", "lambda_", "precomputed", "mask_prob"):
                if getattr(cfg, key) != getattr(DistillConfig(), key):
                    raise UserError(f"distill.{key.rstrip('_')} has no effect without distill.teachers")
        for name in cfg.losses:
            if name not in losses:
                raise UserError(f"distill.losses: {name!r} is not one of {', '.join(losses)}")
        _check_weights(cfg)
        if cfg.lambda_ is not None and not 0 <= cfg.lambda_ <= 1:
            raise UserError(f"distill.lambda={cfg.lambda_} must be between 0 and 1 (the distillation losses' share)")
        if not cfg.temperature > 0:
            raise UserError(f"distill.temperature={cfg.temperature} must be positive")
        chosen = cfg.chosen(default)
        if cfg.temperature != DistillConfig.temperature and not set(temperature_read_by) & set(chosen):
            raise UserError(f"distill.temperature={cfg.temperature} is read by {' and '.join(temperature_read_by)} "
                            f"only, not in distill.losses={chosen}")
        if cfg.mask_prob != DistillConfig.mask_prob and "masked" not in chosen:
            raise UserError(f"distill.mask_prob={cfg.mask_prob} is read by the masked loss only, not in "
                            f"distill.losses={chosen}")
        if not 0 < cfg.mask_prob < 1:
            raise UserError(f"distill.mask_prob={cfg.mask_prob} must be between 0 and 1")
        if cfg.layers and "hidden" not in chosen:
            raise UserError(f"distill.layers={cfg.layers} is read by the hidden loss only, not in distill.losses={chosen}")
        if "hidden" in chosen and not cfg.layers:
            raise UserError("distill.losses: hidden needs distill.layers, e.g. {-1: -1} (student layer: teacher layer)")


def _entry_weight(entry: dict[str, str]) -> float | None:
    """The weight of a `{from: PATH, weight: W}` teacher entry (None without one)."""
    unknown = set(entry) - {"from", "weight"}
    if unknown or not entry.get("from"):
        raise UserError(f"distill.teachers: {entry} is not a path or {{from: PATH, weight: W}}"
                        + (f" (unknown key {sorted(unknown)[0]!r})" if unknown else " (no 'from')"))
    if "weight" not in entry:
        return None
    try:
        weight = float(entry["weight"])
    except ValueError:
        raise UserError(f"distill.teachers: weight {entry['weight']!r} of {entry['from']} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"distill.teachers: weight {entry['weight']} of {entry['from']} must be finite and non-negative")
    return weight


def _check_weights(cfg: DistillConfig) -> None:
    given = [_entry_weight(t) if isinstance(t, dict) else None for t in cfg.teachers]
    if any(w is not None for w in given):
        if None in given:
            raise UserError("distill.teachers: give every entry a weight or none (" + ", ".join(
                f"{p}: {w}" for p, w in zip(cfg.paths, given)) + ")")
        if cfg.weights:
            raise UserError("distill.weights and weights in the distill.teachers entries: give one of them")
    if cfg.weights and len(cfg.weights) != len(cfg.teachers):
        raise UserError(f"distill.weights has {len(cfg.weights)} entries for {len(cfg.teachers)} distill.teachers")
    weights = teacher_weights(cfg) if cfg.teachers else []
    if weights and (not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6):
        where = f"distill.weights={cfg.weights}" if cfg.weights else f"the distill.teachers weights {weights}"
        raise UserError(f"{where} must be non-negative and sum to 1")


def teacher_weights(cfg: DistillConfig) -> list[float]:
    """One weight per teacher: the entries' `weight`, or distill.weights, or equal."""
    given = [float(t["weight"]) for t in cfg.teachers if isinstance(t, dict) and "weight" in t]
    return given if len(given) == len(cfg.teachers) else list(cfg.weights) or [1 / len(cfg.teachers)] * len(cfg.teachers)


def loss_weights(cfg, names) -> dict[str, float]:
    """The trainer's weight of each named loss: train.objectives' (default 1), and where
    distill.lambda is set, times λ for a distillation loss (`distill_*`) and 1 - λ for every other."""
    mix = cfg.distill.lambda_

    def share(name: str) -> float:
        return 1.0 if mix is None else mix if name.startswith("distill_") else 1 - mix

    return {name: cfg.train.objectives.get(name, 1.0) * share(name) for name in names}


def fd_loss_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ_i ||student_i - teacher_i||², (N, E) x (N, E) → scalar, in at least fp32: the local sum
    of feature distillation (the student already projected to the teacher's width).
    Memory: O(N·E)."""
    return (at_least_fp32(student) - at_least_fp32(teacher)).pow(2).sum()


def icl_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
             logit_scale: torch.Tensor, *, rank: int = 0, world_size: int = 1, group=None) -> torch.Tensor:
    """Interactive contrastive learning (CLIP-KD §3.3), the global batch's mean.

    With N pairs in the global batch, s the scale (already exponentiated), all features
    L2-normalised and of one width:

        L = 1/2 · [ 1/N Σ_i -log softmax_j(s · s_img_i·t_txt_j)[i] + 1/N Σ_i -log softmax_j(s · s_txt_i·t_img_j)[i] ]

    The student's embeddings are the anchors, the teacher's the keys: gradients reach only the
    student. Across processes the teacher's keys are gathered (no gradient) and each rank scores
    its own anchors, like `graft.losses.clip_loss`: the value is the global batch's, the gradient
    exact for this rank's features and its share for the scale. Memory: two (b, N) fp32 logit
    blocks per rank (b = N / world_size), O(b·N), plus the gathered keys O(N·E).
    """
    _, keys_txt, offset = local_and_gathered(None, t_txt, rank, world_size, group)
    _, keys_img, _ = local_and_gathered(None, t_img, rank, world_size, group)
    b = s_img.shape[0]
    targets = torch.arange(offset, offset + b, device=s_img.device)
    i2t = ce_rows(at_least_fp32(s_img), keys_txt, logit_scale, targets)
    t2i = ce_rows(at_least_fp32(s_txt), keys_img, logit_scale, targets)
    return global_mean((i2t + t2i) / 2, b * world_size, world_size, group)


def crd_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
             logit_scale: torch.Tensor, temperature: float, *, rank: int = 0, world_size: int = 1,
             group=None) -> torch.Tensor:
    """Contrastive relational distillation (CLIP-KD §3.1), the global batch's mean.

    Over the N pairs of the global batch, each model in its own space: student logits
    S_ij = s · s_img_i·s_txt_j (s its scale, exponentiated), teacher logits T_ij = t_img_i·t_txt_j / τ
    (τ = distill.temperature). With p = softmax over a row,

        L = 1/2 · 1/N Σ_i [ KL(p(T_i,:) ‖ p(S_i,:)) + KL(p(T_:,i) ‖ p(S_:,i)) ]

    (image→text rows and text→image rows). Across processes both models' features are gathered,
    the student's with autograd (the other ranks' gradients flow back to their owners) and each
    rank computes its b rows, as `clip_loss`: value the global batch's, gradient exact for the
    local features. Memory: four (b, N) fp32 logit blocks per rank, O(b·N), and O(N·E) gathered.
    """
    s_x, s_y, offset = local_and_gathered(s_img, s_txt, rank, world_size, group)
    t_x, t_y, _ = local_and_gathered(t_img, t_txt, rank, world_size, group)
    b = s_img.shape[0]
    rows = slice(offset, offset + b)
    i2t = _kl_rows(t_x[rows] @ t_y.T / temperature, logit_scale * s_x[rows] @ s_y.T)
    t2i = _kl_rows(t_y[rows] @ t_x.T / temperature, logit_scale * s_y[rows] @ s_x.T)
    return global_mean((i2t + t2i) / 2, b * world_size, world_size, group)


def kd_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
            logit_scale: torch.Tensor, teacher_scale: torch.Tensor, temperature: float = 1.0, *, rank: int = 0,
            world_size: int = 1, group=None) -> torch.Tensor:
    """open_clip's logit distillation (`DistillClipLoss.dist_loss`), the global batch's mean, with
    Hinton's temperature τ (1: open_clip's exactly).

    With student logits S_ij = s · s_img_i·s_txt_j and teacher logits T_ij = t · t_img_i·t_txt_j (each
    model's own exponentiated scale) over the N pairs of the global batch, p = softmax over a row:

        L = τ² · 1/2 · 1/N Σ_i [ -Σ_j p(T_i,:/τ)_j log p(S_i,:/τ)_j  -Σ_j p(T_:,i/τ)_j log p(S_:,i/τ)_j ]

    At τ = 1, `crd` with τ = 1/t plus the teacher's entropy, a constant for the student; τ > 1 softens
    both distributions (the τ² keeps the gradient's size). Gathered and split over processes as
    `crd_loss`. Memory: four (b, N) fp32 logit blocks per rank and O(N·E) gathered.
    """
    s_x, s_y, offset = local_and_gathered(s_img, s_txt, rank, world_size, group)
    t_x, t_y, _ = local_and_gathered(t_img, t_txt, rank, world_size, group)
    b, t, s = s_img.shape[0], at_least_fp32(teacher_scale) / temperature, logit_scale / temperature
    rows = slice(offset, offset + b)
    i2t = _soft_ce_rows(t * t_x[rows] @ t_y.T, s * s_x[rows] @ s_y.T)
    t2i = _soft_ce_rows(t * t_y[rows] @ t_x.T, s * s_y[rows] @ s_x.T)
    return temperature**2 * global_mean((i2t + t2i) / 2, b * world_size, world_size, group)


def _soft_ce_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Σ over rows of -Σ_j softmax(teacher)_j log softmax(student)_j, (b, N) each → scalar."""
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum()


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher) ‖ softmax(student)), (b, N) each → scalar."""
    return F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                    reduction="sum")


def _world() -> dict:
    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    return {}


def _fd(out: dict, taught: list, weights: list[float]) -> torch.Tensor:
    return sum(w * (fd_loss_sum(proj_img, t_img) + fd_loss_sum(proj_txt, t_txt))
               for w, (proj_img, proj_txt), (t_img, t_txt, *_) in zip(weights, out["projected"], taught))


def _icl(out: dict, taught: list, weights: list[float]) -> torch.Tensor:
    n, world = out["image"].shape[0], _world()
    mean = sum(w * icl_loss(F.normalize(p_img, dim=-1), F.normalize(p_txt, dim=-1), t_img, t_txt, out["scale"], **world)
               for w, (p_img, p_txt), (t_img, t_txt, *_) in zip(weights, out["projected"], taught))
    return as_local_sum(mean, n, n * world.get("world_size", 1))


def _crd(out: dict, taught: list, weights: list[float], temperature: float) -> torch.Tensor:
    n, world = out["image"].shape[0], _world()
    mean = sum(w * crd_loss(out["image"], out["text"], t_img, t_txt, out["scale"], temperature, **world)
               for w, (t_img, t_txt, *_) in zip(weights, taught))
    return as_local_sum(mean, n, n * world.get("world_size", 1))


def _kd(out: dict, taught: list, weights: list[float], temperature: float) -> torch.Tensor:
    n, world = out["image"].shape[0], _world()
    mean = sum(w * kd_loss(out["image"], out["text"], t_img, t_txt, out["scale"], t_scale, temperature, **world)
               for w, (t_img, t_txt, t_scale, _) in zip(weights, taught))
    return as_local_sum(mean, n, n * world.get("world_size", 1))


def patch_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(1 - cos(s, t)) + smooth-L1(s, t) (the mean over features) of each patch, (..., D) x (..., D)
    → (...), in at least fp32: RADIO's per-patch feature loss (Ranzinger et al. 2024)."""
    s, t = at_least_fp32(student), at_least_fp32(teacher)
    return 1 - F.cosine_similarity(s, t, dim=-1) + F.smooth_l1_loss(s, t, reduction="none").mean(-1)


def dense_loss_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ over images of the mean over patches of `patch_distance`, student (B, P, D) through its head
    for this teacher, teacher (B, P', D) resized to the student's grid when P' ≠ P (`to_grid`).
    Memory: O(B·P·D)."""
    return patch_distance(student, to_grid(teacher, student.shape[1])).mean(1).sum()


def masked_loss_sum(student: torch.Tensor, teacher: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Σ over the masked patches of `patch_distance` between the student's prediction there (M, D),
    read from the masked image through its head for this teacher, and the teacher's feature of the
    whole image at that patch (teacher (B, P', D) on its grid, resized; `masked` (B, P) bool with M
    True): masked feature modelling (BEiT v2, Peng et al. 2022; EVA, Fang et al. 2023). Memory: O(B·P·D)."""
    return patch_distance(student, to_grid(teacher, masked.shape[1])[masked]).sum()


def to_grid(features: torch.Tensor, patches: int) -> torch.Tensor:
    """(B, P', D) patch features on a square grid → (B, patches, D), bilinearly resized."""
    B, P, D = features.shape
    if P == patches:
        return features
    side, new = math.isqrt(P), math.isqrt(patches)
    grid = features.transpose(1, 2).reshape(B, D, side, side)
    return F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def _dense(out: dict, taught: list, weights: list[float]) -> torch.Tensor:
    return sum(w * dense_loss_sum(mine, t_patches) for w, mine, (*_, t_patches) in zip(weights, out["dense"], taught))


def _masked(out: dict, taught: list, weights: list[float]) -> torch.Tensor:
    return sum(w * masked_loss_sum(mine, t_patches, out["mask"])
               for w, mine, (*_, t_patches) in zip(weights, out["masked"], taught))


def objectives(cfg: DistillConfig, grid: int = 0) -> dict[str, Objective]:
    """`distill_<loss>` for each of `cfg.losses`, over the student's outputs ({"image", "text":
    (B, E_s) normalised; "projected": per teacher (image, text) mapped to its width; "scale";
    "dense" / "masked": per teacher its head's outputs; "mask"}) and the teachers' [(t_img, t_txt,
    t_scale, patches)], each counting the batch's pairs like `itc` (`masked`: its masked patches of
    the student's `grid` x `grid`)."""
    if not cfg.teachers:
        return {}
    weights, pairs = teacher_weights(cfg), lambda batch: batch["pixel_values"].shape[0]
    loss = {"fd": lambda out, batch, taught: _fd(out, taught, weights),
            "icl": lambda out, batch, taught: _icl(out, taught, weights),
            "crd": lambda out, batch, taught: _crd(out, taught, weights, cfg.temperature),
            "kd": lambda out, batch, taught: _kd(out, taught, weights, cfg.temperature),
            "dense": lambda out, batch, taught: _dense(out, taught, weights),
            "masked": lambda out, batch, taught: _masked(out, taught, weights)}
    masked = lambda batch: int(patch_mask(batch["pixel_values"], grid, cfg.mask_prob).sum())  # noqa: E731
    return {f"distill_{name}": Objective(loss[name], masked if name == "masked" else pairs)
            for name in cfg.chosen(DEFAULT)}


def loss_names(cfg: DistillConfig, default: tuple[str, ...] = DEFAULT) -> tuple[str, ...]:
    return tuple(f"distill_{name}" for name in cfg.chosen(default)) if cfg.teachers else ()
