"""The streaming pipeline inside each DataLoader worker: mix sources → decode → tokenise → micro-batch.

A worker is one *slot* of `world_size x workers`; what it reads is a pure function of the seed,
the slot and its position, so the trainer can resume it:

    position = {"mix": draws so far, "sources": [[epoch, records taken in that epoch], ...]}

Sources are mixed record by record: draw j picks source i with probability weight_i (a seeded
draw per (slot, j), redrawn when that source has no data for this slot). Each source loops over
epochs forever; a source with no record for this slot in a whole epoch is dropped, and when
every source is dropped the worker ends its stream.

Bad records are skipped and counted (skips.py); the counts, the first examples of each reason, the
position and the slot travel to the trainer with every micro-batch (`Item`). A worker that meets
only bad records still reports every `REPORT_EVERY` of them, so the trainer never waits silently.

The boundary between "this record is bad" and "graft is broken" is `read_record`: a source's
`example(raw)` and the limits (limits.py) turn one record's bytes into checked Python values or a
`BadSample`; what follows (template, tokenizer, image decode) raises `BadSample` for anything in
the data. Nothing wider is caught, so a bug in graft still surfaces as a traceback.

Resuming re-reads the records of the current epoch a worker had taken (webdataset) without
decoding them; shard problems met during that fast-forward were counted before the checkpoint and
are not counted again.
"""

from __future__ import annotations

import bisect
import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice

from torch.utils.data import IterableDataset, get_worker_info

from graft.data.limits import bounded_turns
from graft.data.processor import Processor
from graft.data.samples import BadSample
from graft.data.skips import SkipLog, StrictError

REPORT_EVERY = 256  # consecutive bad records after which a worker reports its counts anyway
_END = object()


@dataclass
class Item:
    """What a worker hands the trainer: a micro-batch (or none), its counts since the last item."""

    worker: int  # logical worker (see StreamDataset.offset)
    position: dict
    skipped: Counter
    notes: Counter
    examples: list  # (reason, key, detail) of the first skips of each reason since the last item
    batch: dict | None = None
    keys: list[str] = field(default_factory=list)
    end: bool = False
    error: str | None = None


def fresh_position(num_sources: int, epoch: int = 0) -> dict:
    return {"mix": 0, "sources": [[epoch, 0] for _ in range(num_sources)]}


def read_record(proc: Processor, d, source, raw):
    """The processor's row and the notes of one raw record of `source`, or BadSample (the boundary:
    see above); `d` is the data config (its limits). Images are decoded one at a time, each turned
    into pixels before the next is read. Every source's records, the built-in world's included
    (data/stream.py), become rows here."""
    ex = source.example(raw)
    turns, cut = bounded_turns(ex.turns, d)
    places = [p for p in ex.places if p[0] < len(turns)]  # the images of dropped turns go with them
    text, truncated, kept = proc.text_row(turns, places, **({"cells": ex.cells} if ex.cells else {}))  # text first: cheaper than pixels
    notes = ["turns_truncated"] * cut + ["sequence_truncated"] * truncated

    def images():
        for data in ex.images[:kept]:
            image, converted = proc.open(data, d)
            notes.extend([f"converted_{converted}"] if converted else [])
            yield image

    return proc.row(text, images()), notes


class StreamDataset(IterableDataset):
    """An iterable of `Item`s for one rank; each DataLoader worker streams its own slot.

    `offset` rotates worker ids so that, after a resume, DataLoader worker 0 continues the logical
    worker that was next in the round-robin when the checkpoint was taken.
    """

    def __init__(self, sources, weights, proc: Processor, data_cfg, micro_batch: int, rank: int,
                 world_size: int, workers: int, positions: dict[int, dict], offset: int):
        self.sources, self.weights, self.proc, self.cfg = sources, weights, proc, data_cfg
        self.micro_batch, self.rank, self.world_size, self.workers = micro_batch, rank, world_size, workers
        self.positions, self.offset = positions, offset
        self._cum = [sum(weights[: i + 1]) for i in range(len(weights))]

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.offset) % self.workers
        slot, nslots = self.rank * self.workers + logical, self.world_size * self.workers
        position = copy.deepcopy(self.positions.get(logical)) or fresh_position(len(self.sources))
        log = SkipLog(self.cfg.strict)
        try:
            yield from self._batches(logical, slot, nslots, position, log)
        except StrictError as e:
            yield Item(logical, position, *log.take(), end=True, error=str(e))

    def _batches(self, logical: int, slot: int, nslots: int, position: dict, log: SkipLog):
        rows, keys, bad_run = [], [], 0
        for out in self.examples(slot, nslots, position, log):
            if out is None:
                bad_run += 1
                if bad_run % REPORT_EVERY == 0:
                    yield Item(logical, copy.deepcopy(position), *log.take())
                continue
            bad_run = 0
            keys.append(out[0])
            rows.append(out[1])
            if len(rows) == self.micro_batch:
                batch = self.proc.collate(rows)
                yield Item(logical, copy.deepcopy(position), *log.take(), batch=batch, keys=keys)
                rows, keys = [], []
        yield Item(logical, copy.deepcopy(position), *log.take(), end=True)

    def examples(self, slot: int, nslots: int, position: dict, log: SkipLog, epochs: int | None = None):
        """(key, row) per usable record (the processor's row: (ids, labels, [pixels per image]) for a
        VLM), None per skipped one (counted in `log`)."""
        for i, raw in self.records(slot, nslots, position, log, epochs):
            source = self.sources[i]
            try:
                row, notes = read_record(self.proc, self.cfg, source, raw)
            except BadSample as e:
                log.skip(e.reason, source.key(raw), e.detail)
                yield None
                continue
            for name in notes:
                log.note(name)
            yield source.key(raw), row

    def records(self, slot: int, nslots: int, position: dict, log: SkipLog, epochs: int | None = None):
        """(source index, raw record), mixing the sources by weight; advances `position`.
        Endless unless `epochs` limits each source's passes."""
        streams = [self._source_records(i, slot, nslots, position, log, epochs) for i in range(len(self.sources))]
        alive = [True] * len(streams)
        while any(alive):
            i = self._pick(slot, position["mix"], alive)
            raw = next(streams[i], _END)
            if raw is _END:
                alive[i] = False  # redraw with the same j: the picks stay a function of position
                continue
            position["mix"] += 1
            yield i, raw

    def _pick(self, slot: int, j: int, alive: list[bool]) -> int:
        if len(alive) == 1:
            return 0
        for attempt in range(1000):
            u = random.Random(f"mix/{self.cfg.seed}/{slot}/{j}/{attempt}").random() * self._cum[-1]
            i = min(bisect.bisect_right(self._cum, u), len(alive) - 1)
            if alive[i]:
                return i
        return alive.index(True)

    def _source_records(self, i: int, slot: int, nslots: int, position: dict, log: SkipLog, epochs: int | None):
        epoch, start = position["sources"][i]
        while epochs is None or epoch < epochs:
            gate = _Gate(log, open=start == 0)  # shard problems of the fast-forward were counted already
            records = self.sources[i].epoch(epoch, slot, nslots, gate)
            taken = sum(1 for _ in islice(records, start))
            gate.open = True
            for raw in records:
                taken += 1
                position["sources"][i] = [epoch, taken]
                yield raw
            if taken == 0:
                return  # a whole epoch with nothing for this slot
            epoch, start = epoch + 1, 0
            position["sources"][i] = [epoch, 0]


class _Gate:
    """A SkipLog that drops what it is told while closed."""

    def __init__(self, log: SkipLog, open: bool):
        self.log, self.open = log, open

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        if self.open:
            self.log.skip(reason, key, detail)
