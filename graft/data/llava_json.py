"""LLaVA conversation JSON: `[{"id", "image", "conversations": [{"from", "value"}, ...]}, ...]`.

`data.path` is the `.json` file (a list of records) or a `.jsonl` file (one record per line);
`image` paths are relative to `data.image_root` (default: the JSON file's folder). One image per
record, placed where the first human turn's `<image>` marker was; multi-turn conversations put the
loss on every assistant (`gpt`) turn and nothing else. Records without `image` (text-only) are
skipped as `image_missing`: graft trains vision-language pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from graft.config import DataConfig
from graft.data.indexed import IndexedSource
from graft.data.samples import BadSample, Example, conversation_turns
from graft.errors import UserError


def read_records(path: Path) -> list:
    if not path.is_file():
        raise UserError(f"data.path: LLaVA JSON file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"data.path: {path} is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(records, list):
        raise UserError(f"data.path: {path} holds a {type(records).__name__}, not a list of records")
    return records


class LlavaSource(IndexedSource):
    def __init__(self, cfg: DataConfig):
        if not cfg.path:
            raise UserError("data.source=llava needs data.path (the conversation JSON file)")
        path = Path(cfg.path)
        self.name, self.seed = path.name, cfg.seed
        self.records = read_records(path)
        self.root = Path(cfg.image_root) if cfg.image_root else path.parent
        if not self.root.is_dir():
            raise UserError(f"data.image_root: folder not found: {self.root}")

    def __len__(self) -> int:
        return len(self.records)

    def key(self, raw: int) -> str:
        rec = self.records[raw]
        return f"{self.name}[{raw}]" + (f" id={rec['id']}" if isinstance(rec, dict) and "id" in rec else "")

    def example(self, raw: int) -> Example:
        rec = self.records[raw]
        if not isinstance(rec, dict):
            raise BadSample("bad_conversation", "record is not an object")
        if not isinstance(rec.get("image"), str) or not rec["image"]:
            raise BadSample("image_missing", "no `image` field")
        if "conversations" not in rec:
            raise BadSample("text_missing", "no `conversations` field")
        return Example(self.key(raw), self.root / rec["image"], conversation_turns(rec["conversations"]))
