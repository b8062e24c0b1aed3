"""The stream of an indexed source (the built-in world): step s's records by number.

A source is *indexed* when its record i is a pure function of i (data/world_source.py). Then the
batch of step s on rank r holds records s·B·W + r·B + [0, B), so resuming needs nothing but the
step (the "data position" is step x global batch; a run resumed on another number of processes
continues from the records it had seen, `first_sample`). Each record becomes a row exactly as a
streamed one does (`streaming.read_record`: the processor's checks, bad records skipped and
counted), and the rows make a padded batch (`proc.collate`) or, where the run packs, rows of whole
conversations (data/packing.py).
"""

from __future__ import annotations

from graft.data.packing import pack
from graft.data.samples import BadSample
from graft.data.skips import SkipLog, StrictError
from graft.data.streaming import read_record
from graft.errors import UserError


def first_sample(step: int, micro: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 base: tuple[int, int] = (0, 0)) -> int:
    """Index of the first sample of micro-batch `micro` of `step` on `rank`. `base` = (step, samples
    seen by then): a run resumed on another number of processes continues from where it was."""
    base_step, base_samples = base
    return (base_samples + (step - base_step) * batch_size * world_size + rank * batch_size
            + micro * (batch_size // grad_accum))


class IndexedStream:
    """Micro-batches of an indexed `source` for one rank, rows made by `proc`; `packs`: several
    conversations per row (designs.uses_packing decides it for a run)."""

    def __init__(self, source, proc, cfg, rank: int = 0, world_size: int = 1, *, packs: bool):
        self.source, self.proc, self.d = source, proc, cfg.data
        self.batch_size, self.grad_accum = cfg.train.batch_size, cfg.train.grad_accum
        self.rank, self.world_size, self.packs = rank, world_size, packs
        self.log = SkipLog(cfg.data.strict)  # the trainer's side takes its counts (data/loader.py)
        self.base = (0, 0)  # (step, samples seen): see first_sample

    def batch(self, step: int, micro: int) -> dict:
        """Micro-batch `micro` of step `step` for this rank (its usable records)."""
        n = self.batch_size // self.grad_accum
        start = first_sample(step, micro, self.batch_size, self.grad_accum, self.rank, self.world_size, self.base)
        rows = [row for row in map(self.row, range(start, start + n)) if row is not None]
        if not rows:
            counts = ", ".join(f"{r}={k}" for r, k in self.log.skipped.items())
            raise UserError(f"data: none of the {n} records {self.source.key(start)}… of step {step} is usable "
                            f"({counts}); run `graft data check RECIPE` for details")
        if self.packs:
            return pack(rows, self.proc.tok.pad, self.proc.max_seq_len, inputs=self.proc.inputs)
        return self.proc.collate(rows)

    def row(self, index: int):
        """Record `index` as the processor's row, or None when it is skipped (counted)."""
        try:
            row, notes = read_record(self.proc, self.d, self.source, index)
        except BadSample as e:
            try:
                self.log.skip(e.reason, self.source.key(index), e.detail)
            except StrictError as strict:
                raise UserError(str(strict)) from None
            return None
        for name in notes:
            self.log.note(name)
        return row
