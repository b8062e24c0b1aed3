"""What the trainer composes beside a model's own losses: objectives and frozen teachers.

A model's `forward(**batch)` returns (outputs, {name: local sum}), the losses that belong to the
model (next-token cross-entropy, a contrastive loss, ITM, an MoE balancing loss), and
`loss_counts(**batch)` what each sum is over. A design may add, by name:

- `Objective`s: a function of (the student's outputs, the batch, the teacher's outputs) returning
  a local sum, and what it counts. The trainer divides, weighs (`train.objectives`) and logs them
  exactly like the model's own losses (graft/losses.py `weighted`).
- a `Teacher`: a frozen module the trainer holds outside the student's module tree, so it is never
  optimised, never in the student's checkpoint, never one of its FSDP/DDP units, and its FLOPs are
  counted apart from the student's training FLOPs (trainer/flops.py).

`StepLosses` puts the two together for one micro-batch. EVE's alignment to a vision tower is one such
objective and teacher (designs/fuyu.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Objective:
    loss: Callable  # (student outputs, batch, teacher outputs) → local sum, a 0-d tensor
    count: Callable  # batch → how many items the sum is over (summed over micro-batches and processes)


class Teacher:
    """A frozen module and how it reads a batch: `read(module, batch)` → what the objectives get."""

    def __init__(self, module: nn.Module, read: Callable):
        self.module, self.read = module.eval().requires_grad_(False), read

    def to(self, device) -> Teacher:
        self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict):
        return self.read(self.module, batch)


class StepLosses:
    """A micro-batch's named losses: the model's own and the design's objectives, with their counts."""

    def __init__(self, model: nn.Module, objectives: dict[str, Objective] | None = None,
                 teacher: Teacher | None = None, inputs: dict | None = None):
        self.model, self.objectives, self.teacher = model, objectives or {}, teacher
        self.inputs = inputs or {}  # what the design's model takes in training besides the batch

    def to(self, device) -> StepLosses:
        """The teacher onto `device` (the model moves on its own)."""
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def counts(self, batch: dict) -> dict[str, int]:
        return {**self.model.loss_counts(**batch), **{n: int(o.count(batch)) for n, o in self.objectives.items()}}

    def teach(self, batch: dict):
        """The teacher's outputs for `batch` (None without a teacher)."""
        return None if self.teacher is None else self.teacher(batch)

    def losses(self, engine, batch: dict, taught=None) -> dict[str, torch.Tensor]:
        """`engine` (the model, or its DDP wrapper) on `batch`, then each objective; `taught`: the
        teacher's outputs when already computed (FLOP counting keeps them out of the student's)."""
        taught = self.teach(batch) if taught is None else taught
        outputs, losses = engine(**batch, **self.inputs)
        return {**losses, **{n: o.loss(outputs, batch, taught) for n, o in self.objectives.items()}}
