"""LLaVA conversation JSON: `[{"id", "image", "conversations": [{"from", "value"}, ...]}, ...]`.

`data.path` is the `.json` file (a list of records) or a `.jsonl` file (one record per line);
`image` is one path or a list of paths (LLaVA-OneVision / LLaVA-Interleave multi-image records),
relative to `data.image_root` (default: the JSON file's folder), none leaving it; at most
`data.max_images` of them. The `<image>` markers of the human turns place the images, in order
(samples.py); multi-turn conversations put the loss on every assistant (`gpt`) turn and nothing
else. Records without `image` (text-only) are skipped as `image_missing`: graft trains
vision-language pairs.

A `.json` file is one document: if it cannot be parsed the whole file is refused (one line naming
it). A `.jsonl` file keeps its lines as text and parses each when it is read, within the limits of
limits.py, so one bad line is one skipped record.
"""

from __future__ import annotations

from pathlib import Path

from graft.config import DataConfig
from graft.data.indexed import IndexedSource
from graft.data.limits import check_depth, image_path, parse_json, read_document
from graft.data.samples import (
    BadSample,
    Example,
    check_image_count,
    conversation_turns,
    make_example,
)
from graft.errors import UserError


def read_records(path: Path) -> list:
    """The records of a .json file, or the (unparsed) lines of a .jsonl file."""
    if not path.is_file():
        raise UserError(f"data.path: LLaVA JSON file not found: {path}")
    if path.suffix == ".jsonl":
        try:
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"data.path: {path} is not UTF-8 text") from None
    records = read_document(path, "data.path")
    if not isinstance(records, list):
        raise UserError(f"data.path: {path} holds a {type(records).__name__}, not a list of records")
    return records


class LlavaSource(IndexedSource):
    def __init__(self, cfg: DataConfig):
        if not cfg.path:
            raise UserError("data.source=llava needs data.path (the conversation JSON file)")
        path = Path(cfg.path)
        self.name, self.seed, self.cfg = path.name, cfg.seed, cfg
        self.records = read_records(path)
        self.root = Path(cfg.image_root) if cfg.image_root else path.parent
        if not self.root.is_dir():
            raise UserError(f"data.image_root: folder not found: {self.root}")

    def __len__(self) -> int:
        return len(self.records)

    def key(self, raw: int) -> str:
        rec = self.records[raw]
        has_id = isinstance(rec, dict) and isinstance(rec.get("id"), (str, int))
        return f"{self.name}[{raw}]" + (f" id={str(rec['id'])[:60]}" if has_id else "")  # escaped when logged

    def example(self, raw: int) -> Example:
        rec = self.records[raw]
        if isinstance(rec, str):  # a JSONL line, parsed now
            rec = parse_json(rec, self.cfg, f"line {raw + 1}")
        else:  # a record of the parsed .json document
            check_depth(rec, self.cfg, "record")
        if not isinstance(rec, dict):
            raise BadSample("bad_conversation", "record is not an object")
        names = rec.get("image")
        names = names if isinstance(names, list) else [names]
        check_image_count(len(names), self.cfg.max_images)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise BadSample("image_missing", "no `image` field (a path or a list of paths)")
        images = [image_path(self.root, name) for name in names]
        if "conversations" not in rec:
            raise BadSample("text_missing", "no `conversations` field")
        return make_example(self.key(raw), images, conversation_turns(rec["conversations"]))
