"""webdataset tar shards in the img2dataset layout: `KEY.jpg|.png|.webp` + `KEY.txt` and/or `KEY.json`.

Several images per record are numbered members `KEY.0.jpg`, `KEY.1.png`, ... (webdataset's
`KEY.<field>.<ext>` naming, the field being the image's index: 0, 1, ... without a gap, at most
`data.max_images`); their order is the order of the `<image>` markers of the `.json` conversation,
or, without markers, the order they go in at the start of the first question. A record holds
either one `KEY.jpg` or numbered images, not both (`image_members`). A member numbered
`data.max_images` makes the record `too_many_images` without being read; higher numbers are
never read.

One `ShardSource` is one brace pattern (`data/laion-{000000..000099}.tar`); several are mixed with
weights by streaming.py. Brace expansion and the shuffle buffer are the `webdataset` library's
(`expand_urls`, `shuffle`); reading a shard is tar.py's (bounded memory, every kind of damage
counted); the split is graft's, because resuming needs it to be a pure function of (seed, epoch, slot):

- each epoch the shard list is shuffled with a seed of (data.seed, source, epoch), identically on
  every rank and worker;
- slot `s` of `n` (slot = rank x workers + worker) reads shards s, s+n, s+2n, ... of that order, or,
  when there are fewer shards than slots, reads every shard and keeps records s, s+n, ... — either
  way the slots' records are disjoint and together cover the epoch;
- a per-(epoch, slot) seeded shuffle buffer of `data.shuffle_buffer` records mixes within the slot.

Only the image and text members are ever read, each only up to its limit (an image up to
`data.max_image_bytes`, `.txt` up to `data.max_text_bytes`, `.json` up to `data.max_json_bytes`;
a bigger member is left unread and its record skipped): any other member (`.pyd`, `.pickle`,
`.npy`, ...) is skipped unread, so nothing in a shard is unpickled. The text is `.json`'s
`conversations` (multi-turn) when present, else `.txt`, else `.json`'s `caption`.
"""

from __future__ import annotations

import random
import re
from itertools import islice

import webdataset as wds
from webdataset.shardlists import expand_urls

from graft.config import DataConfig
from graft.data.limits import parse_json
from graft.data.samples import BadSample, Example, make_example, text_turns
from graft.data.skips import SkipLog
from graft.data.tar import read_shard
from graft.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
NUMBERED = re.compile(r"(\d+)\.(?:" + "|".join(IMAGE_EXTS) + ")")  # KEY.3.png's extension: image 3
SYNTHETIC = "syn.txt"  # a record's synthetic caption (`graft data recaption`), read with data.caption_mix
OVERSIZE = {"txt": ("text_too_long", "data.max_text_bytes"), "cls": ("text_too_long", "data.max_text_bytes"),
            "json": ("json_too_large", "data.max_json_bytes"), SYNTHETIC: ("text_too_long", "data.max_text_bytes")}


class ShardSource:
    """A brace pattern of shards whose records' items are image members (`EXTS`); a source of another
    item (data/series_shards.py) names its own members and the word its skip reasons use (`ITEM`)."""

    EXTS: tuple[str, ...] = IMAGE_EXTS
    ITEM = "image"

    def __init__(self, pattern: str, index: int, cfg: DataConfig):
        self.name, self.index, self.cfg = pattern, index, cfg
        self.urls = expand_urls(pattern)
        if not self.urls:
            raise UserError(f"data.shards: {pattern!r} expands to no shard")
        n = cfg.max_images
        numbered = {f"{i}.{ext}": cfg.max_image_bytes for i in range(n) for ext in self.EXTS}
        past = {f"{n}.{ext}": -1 for ext in self.EXTS}  # noted as present (oversize), never read
        self.limits = {ext: cfg.max_image_bytes for ext in self.EXTS} | numbered | past | {
            "txt": cfg.max_text_bytes, "json": cfg.max_json_bytes, SYNTHETIC: cfg.max_text_bytes}
        self.numbered = re.compile(r"(\d+)\.(?:" + "|".join(self.EXTS) + ")")

    def __len__(self) -> int:
        return len(self.urls)

    def epoch(self, epoch: int, slot: int, nslots: int, log: SkipLog):
        """This slot's raw records (dicts of member bytes) of `epoch`, in a seeded order."""
        urls = list(self.urls)
        random.Random(f"shards/{self.cfg.seed}/{self.index}/{epoch}").shuffle(urls)
        by_shard = len(urls) >= nslots
        mine = urls[slot::nslots] if by_shard else urls
        samples = (rec for url in mine for rec in read_shard(url, self.limits, log))
        if not by_shard:
            samples = islice(samples, slot, None, nslots)
        if self.cfg.shuffle_buffer > 1:
            rng = random.Random(f"shuffle/{self.cfg.seed}/{self.index}/{epoch}/{slot}")
            samples = wds.shuffle(self.cfg.shuffle_buffer, min(100, self.cfg.shuffle_buffer), rng=rng)(samples)
        return samples

    def key(self, raw: dict) -> str:
        return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"

    def example(self, raw: dict) -> Example:
        oversize = raw.get("__oversize__", {})
        if any(f"{self.cfg.max_images}.{ext}" in oversize for ext in self.EXTS):
            raise BadSample("too_many_images", f"an item numbered {self.cfg.max_images} > data.max_images - 1")
        for ext, size in oversize.items():
            reason, key = OVERSIZE.get(ext, (f"{self.ITEM}_too_large", "data.max_image_bytes"))
            raise BadSample(reason, f".{ext} of {size} bytes > {key}")
        images = self._images(raw)
        return make_example(self.key(raw), images, text_turns(self._text(raw), self.cfg.caption_prompt))

    def _images(self, raw: dict) -> list[bytes]:
        """The one `KEY.jpg` (first of EXTS), or the numbered items 0, 1, ... in order."""
        plain = next((raw[e] for e in self.EXTS if e in raw), None)
        numbered = {int(m.group(1)) for k in raw if (m := self.numbered.fullmatch(k))}
        if plain is None and not numbered:
            members = [k for k in raw if not k.startswith("__")] + raw.get("__unread__", [])
            raise BadSample(f"{self.ITEM}_missing", f"members: {', '.join(members) or 'none'}")
        if plain is not None and numbered:
            raise BadSample(f"{self.ITEM}_members", "both KEY.<ext> and numbered KEY.<n>.<ext> members")
        if plain is not None:
            return [plain]
        if numbered != set(range(len(numbered))):
            raise BadSample(f"{self.ITEM}_members", f"members numbered {sorted(numbered)}, not 0..{len(numbered) - 1}")
        return [next(raw[f"{i}.{e}"] for e in self.EXTS if f"{i}.{e}" in raw) for i in range(len(numbered))]

    def _text(self, raw: dict):
        mix = self.cfg.caption_mix
        if mix and SYNTHETIC in raw and random.Random(f"caption_mix/{self.cfg.seed}/{self.key(raw)}").random() < mix:
            try:
                return raw[SYNTHETIC].decode("utf-8")
            except UnicodeDecodeError:
                raise BadSample("text_not_utf8", f".{SYNTHETIC}") from None
        meta = parse_json(raw["json"], self.cfg, ".json") if "json" in raw else None
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
