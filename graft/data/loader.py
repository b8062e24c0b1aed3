"""The trainer's side of the data: micro-batches, the data position, skip counts, the start-up check.

`StreamBatches` serves the streaming sources (webdataset, LLaVA JSON, HF datasets) from
`data.workers` DataLoader processes; `IndexedBatches` serves an indexed source's `IndexedStream`
(the built-in world: its position is the step, so it needs no state). Both offer what the trainer calls:
`batch(step, micro)`, `stats(rt)`, `state_dict(rt)`, `summary(rt)`, `close()`.

Resume guarantee for streaming sources: with the same data, `world_size` and `data.workers`, the
checkpoint's per-worker positions restart every worker exactly where the trained batches ended, and
the round-robin over workers continues where it was, so the batches after a resume are the ones an
uninterrupted run would have seen. A webdataset worker re-reads (without decoding) the records of
the current epoch it had already taken; an indexed source skips them for free. With another world
size or worker count the positions cannot be mapped: every worker starts the epoch after the
latest one reached (a warning says so), so some records of the interrupted epoch are not seen.

The start-up check: over the first `data.check_batches` micro-batches (or as many records skipped),
if fewer than `data.min_good_fraction` of the records read are usable, training stops with the
counts by reason — never the silent "loss 0" run on nothing.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from graft.data.skips import NOTES, REASONS, SkipReporter, records_skipped, summary
from graft.data.streaming import StreamDataset, fresh_position
from graft.errors import UserError


class StartupCheck:
    def __init__(self, data_cfg, micro_batch: int):
        self.batches_left, self.min_good = data_cfg.check_batches, data_cfg.min_good_fraction
        self.window = max(1, data_cfg.check_batches * micro_batch)
        self.done = data_cfg.check_batches <= 0

    def update(self, used: int, skipped: Counter, batch_arrived: bool) -> None:
        if self.done:
            return
        self.batches_left -= int(batch_arrived)
        bad = records_skipped(skipped)
        if self.batches_left > 0 and bad < self.window:
            return
        self.done = True
        if used < self.min_good * (used + bad) or used == 0:
            raise UserError(failure("data check failed", used, skipped, f"the first {used + bad} records", self.min_good))


def failure(what_happened: str, used: int, skipped: Counter, records: str, min_good: float) -> str:
    counts = ", ".join(f"{r}={n}" for r, n in skipped.items() if n) or "none"
    return (f"{what_happened}: {used} of {records} usable (data.min_good_fraction={min_good}); problems: {counts}. "
            "Run `graft data check RECIPE` for details")


class IndexedBatches:
    """The micro-batches of an indexed source (data/stream.py), a pure function of the step: the
    position is the step itself. Skipped records are counted as a streaming source's are, and the
    start-up check reads its first batches.

    While the model trains on one micro-batch, a thread makes the next (rendering, tokenising and
    packing hold the GIL only between torch's kernels, which release it): the data wait of the
    demo drops from a tenth of its steps to almost nothing. Records are pure functions of their
    index, so the batches are those made in turn; a batch's skip counts are added when it is served."""

    def __init__(self, stream, cfg):
        self.stream, self.proc = stream, stream.proc
        self.check = StartupCheck(cfg.data, cfg.train.batch_size // cfg.train.grad_accum)
        self.skipped, self.notes, self.used = Counter(), Counter(), 0
        self.reporter = SkipReporter(f"data (rank {stream.rank})", self.skipped)
        self.accum = cfg.train.grad_accum
        self.pool, self.ahead = ThreadPoolExecutor(1, thread_name_prefix="graft-data"), None  # ahead: (key, future)

    def batch(self, step: int, micro: int) -> dict:
        ready = self.ahead[1] if self.ahead and self.ahead[0] == (step, micro) else self.pool.submit(self._make, step, micro)
        following = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        self.ahead = (following, self.pool.submit(self._make, *following))
        batch, error, (skipped, notes, examples) = ready.result()
        self.reporter.add(skipped, examples)  # adds to self.skipped; counted even when no record was usable
        self.notes.update(notes)
        if error is not None:
            raise error
        self.used += self.stream.batch_size // self.stream.grad_accum - records_skipped(skipped)
        self.check.update(self.used, self.skipped, batch_arrived=True)
        return batch

    def _make(self, step: int, micro: int):
        """(batch or None, the UserError that stopped it or None, its skip log); run on the pool's thread."""
        try:
            return self.stream.batch(step, micro), None, self.stream.log.take()
        except UserError as e:
            return None, e, self.stream.log.take()

    def stats(self, rt) -> dict:
        return _stats(self.skipped, self.notes, rt)

    def state_dict(self, rt) -> None:
        return None  # the position is the step (and the samples seen, kept by the trainer)

    def resume(self, step: int, samples_seen: int) -> None:
        """Continue after `samples_seen` samples at `step` (the same unless the number of processes changed)."""
        if self.ahead is not None:  # made from the old position: dropped unserved, with its counts
            self.ahead[1].result()
            self.ahead = None
        self.stream.base = (step, samples_seen)

    def summary(self, rt) -> str:
        """The counts, where a record was skipped or noted (call on every rank)."""
        return _summary(self.skipped, self.notes, self.used, rt, quiet=True)

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead[1].cancel()
        self.pool.shutdown(wait=True)


# A worker hands each batch's tensors over as file descriptors, through a Unix socket that
# multiprocessing creates at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX: 32 characters after TMPDIR, and
# a socket path holds at most 107. Past that the workers fail ("AF_UNIX path too long"), or at the
# very limit the loader waits for ever.
SOCKET_PATH_MAX, SOCKET_SUFFIX = 107, len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def _check_socket_room() -> None:
    tmp = tempfile.gettempdir()
    if len(tmp) + SOCKET_SUFFIX > SOCKET_PATH_MAX:
        raise UserError(f"data.workers: the temporary folder {tmp} ({len(tmp)} characters) is too long for the "
                        f"workers' sockets (at most {SOCKET_PATH_MAX - SOCKET_SUFFIX}): set a shorter TMPDIR, "
                        "or data.workers=0")


class StreamBatches:
    def __init__(self, cfg, proc, sources, weights, rank: int, world_size: int, saved: dict | None):
        d, self.proc = cfg.data, proc
        self.rank, self.world_size, self.workers = rank, world_size, max(1, d.workers)
        self.micro_batch = cfg.train.batch_size // cfg.train.grad_accum
        positions, self.offset, self.skipped, self.notes, self.used = self._restore(saved, len(sources))
        self.reporter = SkipReporter(f"data (rank {rank})", self.skipped)  # running totals across resume
        self.consumed = 0  # items taken since (re)start; the next item comes from worker offset + consumed
        self.positions = dict(positions)
        self.check = StartupCheck(d, self.micro_batch)
        dataset = StreamDataset(sources, weights, proc, d, self.micro_batch, rank, world_size, self.workers,
                                positions, self.offset)
        if d.workers:
            _check_socket_room()
        self.loader = DataLoader(dataset, batch_size=None, num_workers=d.workers, collate_fn=_identity,
                                 persistent_workers=False)
        self._it = None
        self.last_keys: list[str] = []

    def batch(self, step: int, micro: int) -> dict:
        """The next micro-batch (streaming sources are sequential; step and micro are not needed)."""
        if self._it is None:
            self._it = iter(self.loader)
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                raise UserError(failure("the data ran out of usable records", self.used, self.skipped,
                                        "all records read", self.check.min_good)) from None
            self.consumed += 1
            self.positions[item.worker] = item.position
            self.reporter.add(item.skipped, item.examples)  # adds to self.skipped
            self.notes.update(item.notes)
            if item.error:
                raise UserError(item.error)
            if item.batch is not None:
                self.used += len(item.keys)
                self.last_keys = item.keys
            self.check.update(self.used, self.skipped, batch_arrived=item.batch is not None)
            if item.batch is not None:
                return item.batch

    def resume(self, step: int, samples_seen: int) -> None:
        pass  # the saved worker positions were restored when it was built (or it said why not)

    def stats(self, rt) -> dict:
        return _stats(self.skipped, self.notes, rt)

    def summary(self, rt) -> str:
        return _summary(self.skipped, self.notes, self.used, rt)

    def state_dict(self, rt) -> dict:
        """Every rank's worker positions (call on every rank; rank 0 writes it into meta.json)."""
        mine = {"positions": {str(w): p for w, p in self.positions.items()},
                "next_worker": (self.offset + self.consumed) % self.workers,
                "skipped": dict(self.skipped), "notes": dict(self.notes), "used": self.used}
        return {"world_size": self.world_size, "workers": self.workers, "ranks": _gather_json(mine, rt)}

    def close(self) -> None:
        self._it = None  # shuts the worker processes down

    def _restore(self, saved: dict | None, num_sources: int):
        if not saved:
            return {}, 0, Counter(), Counter(), 0
        if saved.get("world_size") != self.world_size or saved.get("workers") != self.workers:
            epoch = 1 + max((e for r in saved["ranks"] for p in r["positions"].values() for e, _ in p["sources"]),
                            default=-1)
            print(f"graft data: the checkpoint's data position is for world_size={saved.get('world_size')}, "
                  f"data.workers={saved.get('workers')}; streaming restarts at epoch {epoch}", file=sys.stderr)
            return {w: fresh_position(num_sources, epoch) for w in range(self.workers)}, 0, Counter(), Counter(), 0
        mine = saved["ranks"][self.rank]
        positions = {int(w): p for w, p in mine["positions"].items()}
        return positions, mine["next_worker"], Counter(mine["skipped"]), Counter(mine["notes"]), mine["used"]


def _stats(skipped: Counter, notes: Counter, rt) -> dict:
    """Cumulative counts over all ranks, for metrics.jsonl (call on every rank)."""
    skipped, notes = _sum_counts(skipped, REASONS, rt), _sum_counts(notes, NOTES, rt)
    out = {"data_skipped": records_skipped(skipped)}
    out |= {f"data_skipped/{k}": n for k, n in skipped.items() if n}
    out |= {f"data_note/{k}": n for k, n in notes.items() if n}
    return out


def _summary(skipped: Counter, notes: Counter, used: int, rt, quiet: bool = False) -> str:
    """The counts of all ranks; `quiet`: nothing when no record was skipped or noted."""
    used = int(_sum_counts(Counter(used=used), {"used": 0}, rt)["used"])
    skipped, notes = _sum_counts(skipped, REASONS, rt), _sum_counts(notes, NOTES, rt)
    if quiet and not any(skipped.values()) and not any(notes.values()):
        return ""
    return summary(skipped, notes, used)


def _identity(item):
    return item


def _sum_counts(counts: Counter, keys, rt) -> Counter:
    names = list(keys)
    if rt.world_size == 1:
        return Counter({k: counts[k] for k in names})
    t = torch.tensor([counts[k] for k in names], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return Counter({k: int(v) for k, v in zip(names, t.tolist())})


def _gather_json(obj, rt) -> list:
    """all_gather of a JSON-able object (no pickle): bytes padded to the longest rank's."""
    if rt.world_size == 1:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=rt.device)
    size = torch.tensor([data.numel()], device=rt.device)
    sizes = [torch.zeros_like(size) for _ in range(rt.world_size)]
    dist.all_gather(sizes, size)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=rt.device)
    padded[: data.numel()] = data
    out = [torch.zeros_like(padded) for _ in range(rt.world_size)]
    dist.all_gather(out, padded)
    return [json.loads(bytes(o[: int(s.item())].tolist()).decode()) for o, s in zip(out, sizes)]
