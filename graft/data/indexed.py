"""Sources whose records can be indexed (a JSON list, an Arrow table): a seeded permutation per epoch.

Each epoch, records are visited in the order of a permutation seeded by (data.seed, epoch), the same
on every rank and worker; slot `s` of `n` (slot = rank x workers + worker) takes positions s, s+n,
s+2n, ... of it. The slots are disjoint and cover the epoch; resuming at record k of an epoch skips
k indices without reading them.
"""

from __future__ import annotations

import numpy as np

from graft.data.samples import Example
from graft.data.skips import SkipLog


class IndexedSource:
    name = "indexed"
    seed = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def epoch(self, epoch: int, slot: int, nslots: int, log: SkipLog):
        """Record indices of this slot in `epoch` (cheap to skip: nothing is read until `example`)."""
        order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self))
        return iter(order[slot::nslots].tolist())

    def key(self, raw: int) -> str:
        return f"{self.name}[{raw}]"

    def example(self, raw: int) -> Example:
        raise NotImplementedError
