"""Bounded work per record: whatever one record's bytes hold, reading it costs little and cannot crash.

Data from the web is hostile by accident or on purpose: a `.json` with an integer literal of tens
of thousands of digits or arrays nested thousands deep, a caption of megabytes with no space, an
image path of `../../etc/passwd`, an EPS file named `.jpg` (Pillow would run Ghostscript on it).
Every source parses a record's bytes only through the functions here, each of which either returns
plain, size-checked Python values or raises `BadSample` with a named reason (skips.REASONS):

- `parse_json`: at most `data.max_json_bytes`, nesting at most `data.max_json_depth`, integers of
  at most 4300 digits; *any* exception the parser raises on the bytes is that record's problem.
- `bounded_turns`: a caption or conversation of at most `data.max_text_bytes` (all turns) and at
  most `data.max_turns` turns (later turns are dropped and noted, as a reader of a long chat would
  expect; an over-long text is skipped: cutting it would train on half a sentence).
- `read_document`: a whole JSON file a user names (LLaVA .json, COCO captions) parsed at once;
  if it cannot be, that is the file's problem: one line naming it.
- `image_path`: a path from the data stays inside `data.image_root` (lexically: no absolute path,
  no `..` out of it; symlinks a user put in the folder are followed).
- Images (images.py) are read only up to `data.max_image_bytes`, decoded only in the formats of
  `data.image_formats`, and only after the header's size passed `data.max_image_pixels`.

The tokenizer trainer sees only texts that passed these limits (sources.training_corpus), and the
tar reader (tar.py) never reads a member over its limit into memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from graft.config import IMAGE_FORMATS  # noqa: F401 (Pillow format names decoded by default; re-exported)
from graft.data.samples import BadSample
from graft.errors import UserError

# EPS is never allowed: Pillow hands it to Ghostscript.
NEVER = {"EPS": "Pillow runs Ghostscript on EPS data"}
MAX_INT_DIGITS = 4300  # Python's own int/str conversion limit


def check_image_formats(formats: list[str]) -> None:
    Image.init()
    if not formats:
        raise UserError("data.image_formats is empty: no image could be decoded")
    for name in formats:
        if name in NEVER:
            raise UserError(f"data.image_formats: {name} is never allowed ({NEVER[name]})")
        if name not in Image.OPEN:
            raise UserError(f"data.image_formats: {name!r} is not a format Pillow can open "
                            f"(e.g. {', '.join(IMAGE_FORMATS)})")


def _int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise BadSample("text_bad_json", f"an integer of {len(text)} digits")
    return int(text)


def parse_json(data: bytes | str, d, what: str):
    """The JSON value in `data` (a record's `.json` member, or one JSONL line), within `d`'s limits."""
    if len(data) > d.max_json_bytes:
        raise BadSample("json_too_large", f"{what}: {len(data)} bytes > data.max_json_bytes={d.max_json_bytes}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("text_not_utf8", what) from None
    brackets = data.count("[") + data.count("{")  # at C speed; an upper bound on the depth
    try:
        value = json.loads(data, parse_int=_int)
    except BadSample:
        raise
    except RecursionError:
        raise BadSample("json_too_deep", f"{what}: nested too deep to parse") from None
    except Exception as e:  # JSONDecodeError, and whatever else the parser meets in these bytes
        raise BadSample("text_bad_json", f"{what}: {type(e).__name__}") from None
    return value if brackets <= d.max_json_depth else check_depth(value, d, what)


def check_depth(value, d, what: str):
    """`value` (parsed JSON) if its nesting is within data.max_json_depth, else BadSample."""
    if _depth(value, d.max_json_depth) > d.max_json_depth:
        raise BadSample("json_too_deep", f"{what}: nested deeper than data.max_json_depth={d.max_json_depth}")
    return value


def _depth(value, limit: int) -> int:
    """Nesting depth of arrays/objects (a scalar is 0), or limit + 1 as soon as it exceeds `limit`."""
    if not isinstance(value, (list, dict)):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        for child in v.values() if isinstance(v, dict) else v:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return deepest


def bounded_turns(turns: list[tuple[str, str]], d) -> tuple[list[tuple[str, str]], bool]:
    """(turns, whether turns past data.max_turns were dropped); over data.max_text_bytes is a BadSample."""
    chars = sum(len(q) + len(a) for q, a in turns)
    if chars > d.max_text_bytes:  # a character is at least one byte: no need to encode
        raise BadSample("text_too_long", f"{chars} characters > data.max_text_bytes={d.max_text_bytes}")
    try:
        size = sum(len(q.encode()) + len(a.encode()) for q, a in turns)
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: not text a tokenizer takes
        raise BadSample("text_not_utf8", "a lone surrogate") from None
    if size > d.max_text_bytes:
        raise BadSample("text_too_long", f"{size} bytes > data.max_text_bytes={d.max_text_bytes}")
    return turns[: d.max_turns], len(turns) > d.max_turns


def image_path(root: Path, name: str) -> Path:
    """`root / name`, refusing a path from the data that leaves `root` (absolute, or `..` out of it)."""
    if "\0" in name:
        raise BadSample("image_not_found", "a NUL byte in the path")
    path = Path(os.path.normpath(root / name))
    if os.path.isabs(name) or not path.is_relative_to(os.path.normpath(root)):
        raise BadSample("image_outside_root", name)
    return path


def read_document(path: Path, key: str):
    """A whole JSON file a user names (`key` is the option or config key that named it): parsed at
    once, integers within 4300 digits; a file that cannot be parsed is one line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_int=_int)
    except (UnicodeDecodeError, ValueError, RecursionError, BadSample) as e:  # JSONDecodeError is a ValueError
        why = "nested too deep" if isinstance(e, RecursionError) else str(e).splitlines()[0][:80]
        raise UserError(f"{key}: {path} is not valid JSON ({why})") from None
