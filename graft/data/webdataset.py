"""webdataset tar shards in the img2dataset layout: `KEY.jpg|.png|.webp` + `KEY.txt` and/or `KEY.json`.

One `ShardSource` is one brace pattern (`data/laion-{000000..000099}.tar`); several are mixed with
weights by streaming.py. Reading, key grouping and the shuffle buffer are the `webdataset`
library's (`tarfile_samples`, `shuffle`); the split is graft's, because resuming needs it to be a
pure function of (seed, epoch, slot):

- each epoch the shard list is shuffled with a seed of (data.seed, source, epoch), identically on
  every rank and worker;
- slot `s` of `n` (slot = rank x workers + worker) reads shards s, s+n, s+2n, ... of that order, or,
  when there are fewer shards than slots, reads every shard and keeps records s, s+n, ... — either
  way the slots' records are disjoint and together cover the epoch;
- a per-(epoch, slot) seeded shuffle buffer of `data.shuffle_buffer` records mixes within the slot.

Only the image and text members are ever read: any other member (`.pyd`, `.pickle`, `.npy`, ...)
is skipped unread, so nothing in a shard is unpickled. The text is `.json`'s `conversations`
(multi-turn) when present, else `.txt`, else `.json`'s `caption`.
"""

from __future__ import annotations

import json
import random
from itertools import islice

import webdataset as wds
from webdataset.shardlists import expand_urls

from graft.config import DataConfig
from graft.data.samples import BadSample, Example, text_turns
from graft.data.skips import SkipLog
from graft.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")


def _member_ext(fname: str) -> str:
    base = fname.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


def _wanted(fname: str) -> bool:
    return _member_ext(fname) in IMAGE_EXTS + TEXT_EXTS


class ShardSource:
    def __init__(self, pattern: str, index: int, cfg: DataConfig):
        self.name, self.index, self.cfg = pattern, index, cfg
        self.urls = expand_urls(pattern)
        if not self.urls:
            raise UserError(f"data.shards: {pattern!r} expands to no shard")

    def __len__(self) -> int:
        return len(self.urls)

    def epoch(self, epoch: int, slot: int, nslots: int, log: SkipLog):
        """This slot's raw records (webdataset sample dicts) of `epoch`, in a seeded order."""
        urls = list(self.urls)
        random.Random(f"shards/{self.cfg.seed}/{self.index}/{epoch}").shuffle(urls)
        by_shard = len(urls) >= nslots
        mine = urls[slot::nslots] if by_shard else urls
        shards = _ShardList(mine)
        samples = wds.tarfile_samples(shards, handler=_ShardErrors(log, shards), select_files=_wanted)
        if not by_shard:
            samples = islice(samples, slot, None, nslots)
        if self.cfg.shuffle_buffer > 1:
            rng = random.Random(f"shuffle/{self.cfg.seed}/{self.index}/{epoch}/{slot}")
            samples = wds.shuffle(self.cfg.shuffle_buffer, min(100, self.cfg.shuffle_buffer), rng=rng)(samples)
        return samples

    def key(self, raw: dict) -> str:
        return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"

    def example(self, raw: dict) -> Example:
        image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        if image is None:
            raise BadSample("image_missing", f"members: {', '.join(k for k in raw if not k.startswith('__'))}")
        text = _text(raw)
        return Example(self.key(raw), image, text_turns(text, self.cfg.caption_prompt))


def _text(raw: dict):
    meta = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadSample("text_not_utf8", ".json") from None
        except json.JSONDecodeError:
            raise BadSample("text_bad_json") from None
        if isinstance(meta, dict) and "conversations" in meta:
            return meta
    if "txt" in raw:
        try:
            return raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("text_not_utf8", ".txt") from None
    if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        return meta["caption"]
    raise BadSample("text_missing")


class _ShardList:
    """The url stream webdataset opens, remembering which shard is being read (for error counts)."""

    def __init__(self, urls: list[str]):
        self.urls, self.current = urls, None

    def __iter__(self):
        for url in self.urls:
            self.current = url
            yield {"url": url}


class _ShardErrors:
    """webdataset's exception handler: count a broken shard once per epoch, then carry on."""

    def __init__(self, log: SkipLog, shards: _ShardList):
        self.log, self.shards, self.seen = log, shards, set()

    def __call__(self, exn: Exception) -> bool:
        missing = isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError))
        reason = "shard_missing" if missing else "shard_corrupt"
        where = self.shards.current or "?"
        if (reason, where) not in self.seen:
            self.seen.add((reason, where))
            self.log.skip(reason, where, type(exn).__name__)
        return True  # continue with the next member or shard
