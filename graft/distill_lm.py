"""Knowledge distillation of a generating model (`model: vlm`) from frozen VLM teachers: the two
losses and the objectives a design hands the trainer.

A teacher (a graft VLM run with the student's tokenizer and image-token count; designs/vlm_teachers.py)
reads the student's batch — the same token ids, the pixels adapted to its own image size and
normalisation — and gives its logits at the positions that predict an answer token and its hidden
states at the layers `distill.layers` names. Per teacher:

- `logits` (Hinton et al. 2015, token-level): at each answer position i, with student logits s_i
  and teacher logits t_i over the shared vocabulary and temperature τ = distill.temperature,

      τ² · KL(softmax(t_i / τ) ‖ softmax(s_i / τ))

  (τ² keeps the gradient's size independent of τ). Counted like the `lm` loss: answer tokens.
- `hidden` (hidden-state distillation, as TinyBERT/MiniLM do for LMs): for each pair S: T of
  `distill.layers` ({student layer: teacher layer}), the student's layer-S output at every real (non-padding) token, through a
  learned linear map to the teacher's width when the widths differ, against the teacher's layer-T
  output: the mean over features of the squared difference, averaged over the pairs. Counted over
  the real tokens.

The named losses `distill_logits` and `distill_hidden` are the `distill.weights`-weighted sums over
teachers of local sums: each position's term depends on that position alone, so N processes give
the one-process value when the trainer divides by the global count. Memory: the logits at answer
positions, O(answers · vocab) per teacher; the hidden states, O(tokens · D) per pair and teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.errors import UserError
from graft.losses import IGNORE, at_least_fp32
from graft.objectives import Objective

LOSSES = ("logits", "hidden")
DEFAULT = ("logits",)


def logit_kd_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ_i τ² KL(softmax(teacher_i / τ) ‖ softmax(student_i / τ)), (N, V) each → scalar, in at least fp32."""
    s, t = at_least_fp32(student) / temperature, at_least_fp32(teacher) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2


def hidden_mse_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ_i mean_d (student_i,d - teacher_i,d)², (N, D) each → scalar, in at least fp32."""
    return (at_least_fp32(student) - at_least_fp32(teacher)).pow(2).mean(-1).sum()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose next token is supervised (position t predicts token t + 1)."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1))


def parse_layers(layers_map: dict[int, int], layers: int, where: str) -> list[tuple[int, int]]:
    """`distill.layers` {student layer: teacher layer} → (student layer, teacher layer) pairs; the
    student's layer is checked against its `layers` here (negative: from the last), the teacher's
    when the teacher is loaded."""
    pairs = []
    for s, t in layers_map.items():
        if not -layers <= s < layers:
            raise UserError(f"{where}: {{{s}: {t}}}: the student's LM has {layers} layers")
        pairs.append((s % layers, t))
    return pairs


def objectives(cfg, weights: list[float], pad: int) -> dict[str, Objective]:
    """`distill_<loss>` for each loss chosen (`distill.losses`, default `logits`), over the student's outputs ({"logits": (answers, V),
    "hidden": per teacher, per pair (tokens, D_teacher)}) and the teachers' [(logits, [hidden per pair])]."""
    def logits(out, batch, taught):
        return sum(w * logit_kd_sum(out["logits"], t_logits, cfg.temperature) for w, (t_logits, _) in zip(weights, taught))

    def hidden(out, batch, taught):
        return sum(w * sum(hidden_mse_sum(s, t) for s, t in zip(mine, theirs)) / len(theirs)
                   for w, mine, (_, theirs) in zip(weights, out["hidden"], taught))

    counts = {"logits": lambda batch: (batch["labels"] != IGNORE).sum(),
              "hidden": lambda batch: (batch["input_ids"] != pad).sum()}
    loss = {"logits": logits, "hidden": hidden}
    return {f"distill_{name}": Objective(loss[name], counts[name]) for name in cfg.chosen(DEFAULT)}
