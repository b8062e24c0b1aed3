"""Interleaved web documents (OBELICS, MMC4): text segments with images between them, one example each.

A document is `{"texts": [...], "images": [...]}` (OBELICS): parallel lists holding at each position
exactly one non-null entry, a text segment or an image. MMC4's own layout, `{"text_list": [...],
"image_info": [{"image_name": ..., "matched_text_index": i}, ...]}`, is read as the same sequence,
each image just before the sentence it matches (images matched to one sentence keep their order).

Every text segment is the answer of one turn, so the loss is on all of the document's text; the
images since the previous segment go at the start of that turn's question, which has no text:

    texts   T0    -     T1    -     -     T2        <|user|>           <|assistant|> T0 <eos>
    images  -     a     -     b     c     -     →   <|user|> a         <|assistant|> T1 <eos>
                                                    <|user|> b \\n c    <|assistant|> T2 <eos>

Images after the last segment would teach nothing: they are dropped unread. A blank segment is no
turn (its images wait for the next one). `data.max_images` counts the images kept, before any is
read; `data.max_text_bytes`, `data.max_turns` and `lm.max_seq_len` bound the text as for every
source (streaming.py), so a long document trains on its first turns that fit. Skipped
(skips.py): lists that are not parallel, a position with both or neither, a text that is not a
string, an image that is not a path in .jsonl (`bad_document`); no text (`text_missing`); no image
before the last text (`image_missing`); shard members that are not the document's images.

Two containers:
- JSON Lines (`data.path`: a `.jsonl` file, or a folder whose `*.jsonl` files are read in name
  order), one document per line; images are paths relative to `data.image_root` (default: the
  file's folder), none leaving it. Lines are indexed by byte offset when the source is built and
  read when used, so no line is held in memory and one over `data.max_json_bytes` is never read.
- webdataset shards (`data.shards`): a record's `.json` holds the document and its images are the
  members `KEY.0.jpg`, `KEY.1.png`, ... in order of appearance (or one `KEY.jpg`), read by tar.py
  as webdataset.py reads them; in the `.json` a non-null `images` entry only marks the place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graft.config import DataConfig
from graft.data.indexed import IndexedSource
from graft.data.limits import image_path, parse_json
from graft.data.samples import BadSample, Example, Place, check_image_count
from graft.data.webdataset import IMAGE_EXTS, NUMBERED, ShardSource
from graft.errors import UserError

_CHUNK = 1 << 16  # bytes read at a time past the limit of an over-long line


def positions(rec) -> list[tuple[str | None, object]]:
    """(text, None) or (None, image) per position of a parsed document, in order (either layout)."""
    if not isinstance(rec, dict):
        raise BadSample("bad_document", f"a {type(rec).__name__}, not an object")
    if "text_list" in rec and "texts" not in rec:
        return _mmc4(rec)
    texts, images = rec.get("texts"), rec.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise BadSample("bad_document", "no `texts` and `images` lists (OBELICS), nor a `text_list` (MMC4)")
    if len(texts) != len(images):
        raise BadSample("bad_document", f"{len(texts)} texts for {len(images)} images (parallel lists)")
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadSample("bad_document", f"position {i} holds {'neither' if text is None else 'both'} "
                            "a text and an image")
        if text is not None and not isinstance(text, str):
            raise BadSample("bad_document", f"texts[{i}] is {type(text).__name__}, not a string")
    return list(zip(texts, images))


def _mmc4(rec: dict) -> list[tuple[str | None, object]]:
    texts, info = rec["text_list"], rec.get("image_info", [])
    if not isinstance(texts, list) or not isinstance(info, list):
        raise BadSample("bad_document", "MMC4 `text_list` and `image_info` must be lists")
    before = [[] for _ in texts]  # image names, per sentence they go before
    for k, image in enumerate(info):
        at = image.get("matched_text_index") if isinstance(image, dict) else None
        if type(at) is not int or not 0 <= at < len(texts) or image.get("image_name") is None:
            raise BadSample("bad_document", f"image_info[{k}] is not an image_name with a matched_text_index "
                            f"of text_list (0..{len(texts) - 1})")
        before[at].append(image["image_name"])
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadSample("bad_document", f"text_list[{i}] is {type(text).__name__}, not a string")
        out += [(None, name) for name in before[i]] + [(text, None)]
    return out


def interleave(where: list[tuple[str | None, object]]) -> tuple[list[tuple[str, str]], list[Place], list]:
    """(turns, places, images kept): each non-blank text an answer, after an empty question holding
    the images since the previous text; images after the last text are left out."""
    turns, places, images, waiting = [], [], [], []
    for text, image in where:
        if image is not None:
            waiting.append(image)
        elif text := text.strip():
            places += [(len(turns), 0)] * len(waiting)
            images += waiting  # in place: linear in the document, however its images and texts alternate
            waiting = []
            turns.append(("", text))
    if not turns:
        raise BadSample("text_missing", "no text segment")
    if not images:
        raise BadSample("image_missing", "no image before the last text segment")
    return turns, places, images


def _line_index(path: Path, file: int, limit: int) -> list[tuple[int, int, int, int]]:
    """(file, line number, byte offset, length) of each non-blank line of `path`; at most `limit` + 2
    bytes of a line are held at once (the rest of a longer one is skipped in chunks)."""
    out, number, offset = [], 0, 0
    with path.open("rb") as f:
        while first := f.readline(limit + 2):  # + "\r\n"
            number, length, piece = number + 1, len(first), first
            while not piece.endswith(b"\n") and (piece := f.readline(_CHUNK)):
                length += len(piece)
            if length > len(first) or first.strip():
                out.append((file, number, offset, length))
            offset += length
    return out


class JsonlDocuments(IndexedSource):
    """Documents one per line of `.jsonl` files, images in a folder."""

    def __init__(self, cfg: DataConfig):
        if not cfg.path:
            raise UserError("data.source=interleaved needs data.path (.jsonl documents) or data.shards")
        path = Path(cfg.path)
        if not path.exists():
            raise UserError(f"data.path: not found: {path}")
        self.files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not self.files:
            raise UserError(f"data.path: {path} holds no .jsonl file")
        self.name, self.seed, self.cfg = path.name, cfg.seed, cfg
        self.root = Path(cfg.image_root) if cfg.image_root else path if path.is_dir() else path.parent
        if not self.root.is_dir():
            raise UserError(f"data.image_root: folder not found: {self.root}")
        rows = [row for i, f in enumerate(self.files) for row in _line_index(f, i, cfg.max_json_bytes)]
        self.lines = np.array(rows, dtype=np.int64).reshape(-1, 4)  # (documents, [file, line, offset, length])

    def __len__(self) -> int:
        return len(self.lines)

    def key(self, raw: int) -> str:
        file, number = self.lines[raw, :2].tolist()
        return f"{self.files[file].name}:{number}"  # escaped when logged

    def example(self, raw: int) -> Example:
        file, number, offset, length = self.lines[raw].tolist()
        if length > self.cfg.max_json_bytes + 2:
            raise BadSample("json_too_large", f"line {number}: {length} bytes > data.max_json_bytes="
                            f"{self.cfg.max_json_bytes}")
        with self.files[file].open("rb") as f:
            f.seek(offset)
            line = f.read(length).rstrip(b"\r\n")
        turns, places, names = interleave(positions(parse_json(line, self.cfg, f"line {number}")))
        check_image_count(len(names), self.cfg.max_images)
        if not all(isinstance(name, str) and name for name in names):
            raise BadSample("bad_document", "an image entry is not a path")
        return Example(self.key(raw), [image_path(self.root, name) for name in names], turns, places)


class InterleavedShards(ShardSource):
    """Documents in webdataset shards: the `.json` member, and the images numbered in order."""

    def __init__(self, pattern: str, index: int, cfg: DataConfig):
        super().__init__(pattern, index, cfg)
        del self.limits["txt"]  # the text is the document's: never read a .txt

    def example(self, raw: dict) -> Example:
        oversize = raw.get("__oversize__", {})
        if "json" in oversize:
            raise BadSample("json_too_large", f".json of {oversize['json']} bytes > data.max_json_bytes")
        if "json" not in raw:
            raise BadSample("text_missing", "no .json member (the document)")
        where = positions(parse_json(raw["json"], self.cfg, ".json"))
        turns, places, marks = interleave(where)
        check_image_count(len(marks), self.cfg.max_images)
        total = sum(image is not None for _, image in where)
        return Example(self.key(raw), self._members(raw, total, len(marks)), turns, places)

    def _members(self, raw: dict, total: int, used: int) -> list[bytes]:
        """The first `used` of the document's `total` images. tar.py reads the members numbered below
        data.max_images and notes the one numbered max_images unread (`__oversize__`)."""
        oversize = raw.get("__oversize__", {})
        plain = [e for e in IMAGE_EXTS if e in raw or e in oversize]
        numbered = {int(m.group(1)): k for k in [*raw, *oversize] if (m := NUMBERED.fullmatch(k))}
        if plain and numbered:
            raise BadSample("image_members", "both KEY.<ext> and numbered KEY.<n>.<ext> images")
        members = {0: plain[0]} if plain else numbered
        if not members:
            raise BadSample("image_missing", f"{total} images in the .json, no image member")
        if set(members) != set(range(len(members))):
            raise BadSample("image_members", f"images numbered {sorted(members)[:10]}, not 0..{len(members) - 1}")
        if len(members) != min(total, self.cfg.max_images + 1):
            raise BadSample("placeholder_mismatch", f"{total} images in the .json, {len(members)} image members")
        for i in range(used):
            if members[i] in oversize:
                raise BadSample("image_too_large", f".{members[i]} of {oversize[members[i]]} bytes > "
                                "data.max_image_bytes")
        return [raw[members[i]] for i in range(used)]
