"""`data.source=arrays`: a folder of time series as plain arrays, with a label each.

Two layouts, told apart by what the folder holds (`data.path`):

    series.npy + labels.txt    one NumPy array (N, C, L) or (N, L, C) of numbers, and N lines of labels
    *.csv + labels.csv         one recording per CSV file (a row per time step, a column per channel,
                               an optional header row), and `FILE.csv,LABEL` lines

`series.npy` is opened memory-mapped and never unpickled (`allow_pickle=False`: an array of Python
objects is refused in one line naming the file). A CSV file is read when its record is (at most
`MAX_CSV_BYTES`); one that is not numbers, or a recording without a label, is one skipped record
(`series_bad`, `label_unknown`). Each record is one turn, `data.class_prompt` → its label; the series
processor then checks its shape against `series.channels` x `series.length` and fills short gaps.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from graft.data.indexed import IndexedSource
from graft.data.samples import ONE_IMAGE, BadSample, Example
from graft.errors import UserError

MAX_CSV_BYTES = 64 << 20  # one recording: 100 Hz x 6 channels x 10 minutes is ~4 MB of text


def read_folder(path: Path) -> tuple[list[str], list[str | None], object]:
    """(record names, their labels (None: unlabelled), a function name → array) of a folder in
    either layout; UserError naming the folder or file if it is neither."""
    if not path.is_dir():
        raise UserError(f"data.path: {path} is not a folder (data.source=arrays reads series.npy + labels.txt, "
                        "or *.csv + labels.csv)")
    if (path / "series.npy").is_file():
        return _numpy(path)
    files = sorted(p.name for p in path.glob("*.csv") if p.name != "labels.csv")
    if not files or not (path / "labels.csv").is_file():
        raise UserError(f"data.path: {path} holds neither series.npy + labels.txt nor *.csv files + labels.csv")
    labels = {}
    for row in csv.reader(io.StringIO(_text(path / "labels.csv"))):
        if len(row) >= 2:
            labels[row[0].strip()] = row[1].strip()
    return files, [labels.get(name) for name in files], lambda name: _csv(path / name)


def _numpy(path: Path):
    try:
        values = np.load(path / "series.npy", mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:  # an object array needs pickle: refused
        raise UserError(f"data.path: {path / 'series.npy'} is not a numeric NumPy array ({str(e)[:80]})") from None
    if values.ndim != 3 or values.dtype.kind not in "fiu":
        raise UserError(f"data.path: {path / 'series.npy'} holds {values.dtype} {values.shape}, not numbers (N, C, L)")
    if not (path / "labels.txt").is_file():
        raise UserError(f"data.path: {path} has series.npy but no labels.txt (one label per line)")
    labels = [line.strip() or None for line in _text(path / "labels.txt").splitlines()]
    if len(labels) != len(values):
        raise UserError(f"data.path: {path / 'labels.txt'} has {len(labels)} lines for {len(values)} series")
    return [str(i) for i in range(len(values))], labels, lambda name: np.asarray(values[int(name)], dtype=np.float32)


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.path: {file} is not UTF-8 text") from None


def _csv(file: Path) -> np.ndarray:
    """One recording (L, C) from a CSV file; a first row that is not numbers is a header."""
    if file.stat().st_size > MAX_CSV_BYTES:
        raise BadSample("series_bad", f"{file.name} is over {MAX_CSV_BYTES >> 20} MiB")
    try:
        rows = list(csv.reader(io.StringIO(file.read_text(encoding="utf-8"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise BadSample("series_bad", f"{file.name}: {str(e)[:60]}") from None
    rows = [r for r in rows if r]
    try:
        numbers = [[float(v) for v in r] for r in rows]
    except ValueError:  # a header row, or values that are not numbers
        try:
            numbers = [[float(v) for v in r] for r in rows[1:]]
        except ValueError:
            raise BadSample("series_bad", f"{file.name} holds values that are not numbers") from None
    if not numbers or len({len(r) for r in numbers}) != 1:
        raise BadSample("series_bad", f"{file.name}: rows of different lengths")
    return np.asarray(numbers, dtype=np.float32)


def load_series_file(path: str) -> np.ndarray:
    """One recording a user points at (`graft generate --series`): a .npy array (never unpickled) or
    a CSV file; errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"series file not found: {file}")
    if file.suffix == ".csv":
        try:
            return _csv(file)
        except BadSample as e:
            raise UserError(f"{file} is not a usable series ({e.detail})") from None
    try:
        values = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{file} is not a numeric NumPy array ({str(e)[:80]})") from None
    if values.ndim != 2 or values.dtype.kind not in "fiu":
        raise UserError(f"{file} holds {values.dtype} {values.shape}, not numbers (channels, length)")
    return values.astype(np.float32)


class ArraySource(IndexedSource):
    """The labelled recordings of a folder (see above), in a seeded permutation per epoch."""

    def __init__(self, d):
        path = Path(d.path)
        self.name, self.seed, self.d = path.name, d.seed, d
        self.names, self.labels, self.read = read_folder(path)

    def __len__(self) -> int:
        return len(self.names)

    def key(self, raw: int) -> str:
        return f"{self.name}/{self.names[raw]}"

    def example(self, raw: int) -> Example:
        if self.labels[raw] is None:
            raise BadSample("label_unknown", "no label for this recording")
        return Example(self.key(raw), [self.read(self.names[raw])], [(self.d.class_prompt, self.labels[raw])], ONE_IMAGE)
