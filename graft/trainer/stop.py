"""Stopping cleanly: on SIGINT (Ctrl-C) or SIGTERM (what Slurm and Kubernetes send before a kill),
and when training diverges.

While training, the first such signal only sets a flag; the loop finishes the step it is in,
saves a checkpoint and raises `Stopped`, which the CLI prints as one line saying where it stopped
and that the same command resumes (exit 128 + the signal's number, as a shell reports a signal).
A second Ctrl-C stops at once, as usual. Under torchrun every rank must stop after the same step
(or the others would wait in a collective forever), so the flag is summed over ranks each step.

A step whose gradients are not finite is skipped on every rank alike (the gradients are already
all-reduced when the trainer looks); `SkipGuard` stops the run with `Diverged` once
`train.max_skipped_steps` steps in a row were skipped, instead of looping on NaN forever.
"""

from __future__ import annotations

import signal
from typing import Self

import torch

from graft.errors import Diverged, Stopped  # noqa: F401 (Stopped: raised by the loop, caught by the CLI)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """`with StopOnSignal() as stop:` ... `stop.requested(rt)` → the signal number, or 0."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self) -> Self:
        for sig in SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker): no clean stop
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def requested(self, rt) -> int:
        """The signal that asked to stop, agreed over ranks (the largest number any rank saw)."""
        if rt.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


class SkipGuard:
    """Counts steps skipped in a row; `update` raises `Diverged` at `limit` (0: never)."""

    def __init__(self, limit: int):
        self.limit, self.run = limit, 0

    def update(self, skipped: bool, step: int, latest_checkpoint) -> None:
        self.run = self.run + 1 if skipped else 0
        if self.limit and self.run >= self.limit:
            raise Diverged(f"training diverged: the {self.run} steps up to step {step} had non-finite gradients "
                           f"and were skipped (train.max_skipped_steps={self.limit}); the latest checkpoint is "
                           f"{latest_checkpoint()}. Lower optim.lr or raise optim.warmup_steps.")
