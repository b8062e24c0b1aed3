"""`data.source=ts`: a UEA/UCR time-series classification file (`.ts`, the format of
timeseriesclassification.com, sktime and aeon) as a source of series with class labels.

The header (`@problemName`, `@dimensions`, `@seriesLength`, `@classLabel true A B ...`, `@missing`,
`@timeStamps`, ...) is read when the source is built; a file it cannot read (no `@data`, no class
labels, time stamps) is refused in one line naming it. After `@data` each line is one recording:
its dimensions separated by `:`, each a comma-separated list of numbers (`?` = missing, read as
NaN), then the class label. A line is kept as text and parsed only when it is read, so one bad line
is one skipped record (`series_bad`: not numbers, another number of dimensions, over
`data.max_text_bytes`; `label_unknown`: a label the header does not declare). Each record becomes one
turn: `data.class_prompt` → the label, about its one series (the processor then checks its
channels and length, at most `series.length` steps, and fills short gaps, data/series_processor.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graft.config import DataConfig
from graft.data.indexed import IndexedSource
from graft.data.samples import ONE_IMAGE, BadSample, Example
from graft.errors import UserError

MAX_FILE_BYTES = 1 << 30  # a .ts file is read whole; larger ones are refused


def read_header(path: Path) -> tuple[dict[str, str], list[str], int]:
    """(header fields, class labels, the number of lines up to @data) of a .ts file, reading no
    further than @data (the config check reads only this); UserError naming the file if unusable."""
    if not path.is_file():
        raise UserError(f"data.path: .ts file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"data.path: {path} is over {MAX_FILE_BYTES >> 20} MiB")
    header, at = {}, None
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if line.lower() == "@data":
                    at = i + 1
                    break
                if line.startswith("@"):
                    name, _, value = line[1:].partition(" ")
                    header[name.lower()] = value.strip()
    except UnicodeDecodeError:
        raise UserError(f"data.path: {path} is not UTF-8 text") from None
    if at is None:
        raise UserError(f"data.path: {path} has no @data line (not a .ts file)")
    if header.get("timestamps", "false").lower() != "false":
        raise UserError(f"data.path: {path} has time stamps (@timeStamps true), which graft does not read yet")
    flag, _, labels = header.get("classlabel", "false").partition(" ")
    if flag.lower() != "true" or not labels.split():
        raise UserError(f"data.path: {path} declares no class labels (@classLabel true A B ...)")
    return header, labels.split(), at


def read_ts(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(header fields, class labels, data lines) of a .ts file; UserError naming it if unusable."""
    header, labels, at = read_header(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"data.path: {path} is not UTF-8 text") from None
    return header, labels, [line for line in lines[at:] if line.strip()]


def parse_line(line: str, labels: list[str], max_bytes: int) -> tuple[np.ndarray, str]:
    """One recording: (dimensions, length) float32 (NaN where missing) and its label; BadSample if unusable."""
    if len(line.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadSample("series_bad", f"a line of over data.max_text_bytes={max_bytes} bytes")
    *dims, label = line.strip().split(":")
    if label.strip() not in labels:
        raise BadSample("label_unknown", f"label {label.strip()[:40]!r} is not one of the header's")
    try:
        rows = [[float("nan") if v.strip() == "?" else float(v) for v in dim.split(",")] for dim in dims]
    except ValueError:
        raise BadSample("series_bad", "a value that is not a number") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise BadSample("series_bad", "dimensions of different lengths")
    return np.asarray(rows, dtype=np.float32), label.strip()


class TsSource(IndexedSource):
    """The recordings of a .ts file, visited in a seeded permutation per epoch (indexed.py)."""

    def __init__(self, d: DataConfig):
        path = Path(d.path)
        self.name, self.seed, self.d = path.name, d.seed, d
        self.header, self.labels, self.lines = read_ts(path)

    def __len__(self) -> int:
        return len(self.lines)

    def example(self, raw: int) -> Example:
        values, label = parse_line(self.lines[raw], self.labels, self.d.max_text_bytes)
        return Example(self.key(raw), [values], [(self.d.class_prompt, label)], ONE_IMAGE)
