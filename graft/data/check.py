"""`graft data check RECIPE`: read a sample of the data through the real processor, count problems.

Every record goes through exactly what training does (source → image decode with the pixel limit →
chat template → tokenizer → truncation to lm.max_seq_len) and lands in one bin: usable, or skipped
for one reason of skips.REASONS (unreadable images, empty answers, placeholder/feature mismatches,
answers cut off by the context length so that every answer token is masked, ...). Notes count
usable records that were converted or cut short. The data is unusable, exit code 1, when fewer
than data.min_good_fraction of the records read are usable; otherwise exit code 0.

At most one pass over the data is read (up to `n` records, mixing sources as training does).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import islice

from graft.build import processor_for  # noqa: F401 (re-exported: what data check reads records with)
from graft.config import Config
from graft.data import skips
from graft.data.sources import build_sources
from graft.data.streaming import StreamDataset, fresh_position


@dataclass
class CheckResult:
    used: int
    skipped: Counter  # reason → records (and shard_* → shards)
    notes: Counter
    min_good: float
    read: int  # records that came out of the sources: used + skipped records, each exactly once

    @property
    def ok(self) -> bool:
        bad = skips.records_skipped(self.skipped)
        return self.used > 0 and self.used >= self.min_good * (self.used + bad)

    def report(self) -> str:
        total = self.used + skips.records_skipped(self.skipped)
        shards = ", ".join(f"{self.skipped[r]} {r}" for r in skips.SHARD_REASONS if self.skipped[r])
        accounts = (f"\naccounting: {self.read} records read = {self.used} used + {total - self.used} skipped"
                    + (f"; shard errors: {shards}" if shards else ""))
        return (skips.summary(self.skipped, self.notes, self.used) + accounts +
                f"\nverdict: {'usable' if self.ok else 'UNUSABLE'} ({self.used} of {total} records usable; "
                f"data.min_good_fraction={self.min_good})")


def check_data(cfg: Config, proc, n: int) -> CheckResult:
    """Counts for the first `n` records of the recipe's data (at most one pass), every source's
    records read as training reads them (`streaming.read_record`)."""
    sources, weights = build_sources(cfg, proc)
    ds = StreamDataset(sources, weights, proc, cfg.data, 1, 0, 1, 1, {}, 0)
    log = skips.SkipLog()
    position = fresh_position(len(sources))
    used = 0
    for out in islice(ds.examples(0, 1, position, log, epochs=1), n):
        used += out is not None
    # mix counts every record drawn from a source
    return CheckResult(used, log.skipped, log.notes, cfg.data.min_good_fraction, position["mix"])
