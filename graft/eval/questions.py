"""A user's visual questions, for `graft eval RUN --task vqa --data PATH`.

- **LLaVA-style JSON / JSONL** (`.json` list or `.jsonl` lines of `{id, image, conversations}`):
  every human → gpt turn is one open question, asked on its own with the image; scored by exact
  match after the harness's normalisation (lower case, outer spaces and a final full stop).
- **VLMEvalKit-style TSV** (multiple choice): columns `index`, `question`, `answer` (a letter),
  options `A`, `B`, ... (empty cells are no option), and `image` (base64) or `image_path`
  (relative to `eval.image_root`, else the TSV's folder). Scored by the first option letter in the
  answer.
- **VQAv2** (a folder with the `*questions*.json` and `*annotations*.json`, or the questions `.json`
  itself, told from LLaVA by its top level: an object with a `questions` list): 10 human answers
  per question, scored by the official soft accuracy, overall and per answer type (eval/vqav2.py).

Records go through the data limits (limits.py): a JSONL line is parsed on its own, image paths may
not leave the image folder, images are decoded with the training limits; a bad record or image is
skipped and counted. A TSV without a required column is one line naming the file and the column.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from dataclasses import replace
from pathlib import Path

from graft.data.limits import image_path
from graft.data.llava_json import LlavaSource
from graft.data.samples import IMAGE_MARKER, BadSample
from graft.data.skips import SkipLog
from graft.errors import UserError
from graft.eval.labelled import image_folder
from graft.eval.question_set import Question, QuestionSet
from graft.eval.vqav2 import load_vqav2

OPTIONS = "ABCDEFGHIJ"


def load_questions(path: str, cfg) -> QuestionSet:
    p, d = Path(path), cfg.data
    if p.is_dir() or (p.suffix == ".json" and p.is_file() and _holds_an_object(p)):
        return load_vqav2(p, cfg)
    if not p.is_file():
        raise UserError(f"--data {path}: file not found (a LLaVA-style .json/.jsonl, a VLMEvalKit .tsv "
                        "or a VQAv2 folder / questions .json)")
    if p.suffix == ".tsv":
        return _tsv(p, d, image_folder(cfg, p))
    if p.suffix in (".json", ".jsonl"):
        return _llava(p, d, image_folder(cfg, p))
    raise UserError(f"--data {path}: expected .json, .jsonl (LLaVA layout), .tsv (VLMEvalKit layout) "
                    "or a folder (VQAv2 layout)")


def _holds_an_object(path: Path) -> bool:
    """Whether a .json file's top level is an object (VQAv2 questions) rather than a list (LLaVA)."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"{"


def _llava(path: Path, d, root: Path) -> QuestionSet:

    source = LlavaSource(replace(d, path=str(path), image_root=str(root)))
    log = SkipLog()

    def items():
        for raw in range(len(source)):
            try:
                ex = source.example(raw)
            except BadSample as e:
                log.skip(e.reason, source.key(raw), e.detail)
                continue
            if len(ex.images) != 1:  # a question here is asked about one image
                log.skip("too_many_images", source.key(raw), f"{len(ex.images)} images")
                continue
            for turn, (question, answer) in enumerate(ex.turns):
                yield Question(f"{ex.key}#{turn}", ex.images[0], question.replace(IMAGE_MARKER, "").strip(), answer)

    return QuestionSet(path.name, items, log)


def _tsv(path: Path, d, root: Path) -> QuestionSet:
    csv.field_size_limit(min(sys.maxsize, 1 << 31))  # base64 images are long cells
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f, delimiter="\t"), [])
    for column in ("index", "question", "answer", "A", "B"):
        if column not in header:
            raise UserError(f"{path}: no '{column}' column (VLMEvalKit TSV: index, image or image_path, question, A, B, ..., answer)")
    if "image" not in header and "image_path" not in header:
        raise UserError(f"{path}: no 'image' (base64) or 'image_path' column")
    log = SkipLog()

    def items():
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for line, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
                key = f"{path.name}:{line} index={row.get('index')}"
                try:
                    yield _mc(row, root, d)
                except BadSample as e:
                    log.skip(e.reason, key, e.detail)

    return QuestionSet(path.name, items, log)


def _mc(row: dict, root: Path, d) -> Question:
    options = {k: row[k].strip() for k in OPTIONS if (row.get(k) or "").strip() and row[k].strip().lower() != "nan"}
    answer = (row.get("answer") or "").strip().upper()
    if answer not in options:
        raise BadSample("text_missing", f"answer {answer[:10]!r} is not one of the options {''.join(options)}")
    if len(row.get("question") or "") + sum(map(len, options.values())) > d.max_text_bytes:
        raise BadSample("text_too_long", f"over data.max_text_bytes={d.max_text_bytes}")
    if row.get("image"):
        if len(row["image"]) > d.max_image_bytes * 4 // 3 + 4:
            raise BadSample("image_too_large", "base64 image over data.max_image_bytes")
        try:
            image = base64.b64decode(row["image"], validate=True)
        except (binascii.Error, ValueError):
            raise BadSample("image_unreadable", "the image cell is not base64") from None
    elif row.get("image_path"):
        image = image_path(root, row["image_path"])
    else:
        raise BadSample("image_missing")
    return Question(str(row.get("index")), image, row["question"].strip(), answer, options)
