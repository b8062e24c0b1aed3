"""`data.source=pamap2`: PAMAP2's physical-activity recordings (Reiss & Stricker 2012), cut into windows.

A `subjectNNN.dat` file is space-separated text, one line per 100 Hz time step, 54 columns: time
stamp (s), activity id, heart rate (bpm, about 9 Hz: NaN between readings), then three IMUs — hand,
chest, ankle — of 17 columns each: temperature, 3-axis acceleration ±16 g (m/s²), 3-axis acceleration
±6 g, 3-axis gyroscope (rad/s), 3-axis magnetometer, 4 orientation values (invalid). Dropped
wireless packets are NaN.

`data.path` is a file, a folder of `*.dat` files, or a glob (subjects are picked by file:
`Protocol/subject10[1-7].dat`). Each file is read once, when the source is built, keeping only the
activity and the channels used: the ±16 g acceleration and the gyroscope of each IMU `data.imus`
names (6 channels per IMU, the layout of the built-in sensor world; `series.channels` = 6 x their
number). The time steps are averaged in groups of `data.downsample` (3: 33 Hz, so 256 steps are
7.7 s). A record is a window of `series.length` steps inside one run of one activity (the transient
id 0 is no activity), starting every `data.window_stride` steps (0: series.length, no overlap); its
one turn asks `data.class_prompt`, answered by the activity's name. Gaps are filled or the window
skipped by the series processor (`series.max_gap`). A line whose columns are not numbers, or not 54
of them, ends the run it is in (no window spans it); such lines are counted and said once, when the
file is read. `graft data check` counts the windows used and skipped.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graft.data.indexed import IndexedSource
from graft.data.samples import ONE_IMAGE, Example
from graft.errors import UserError

ACTIVITIES = {1: "lying", 2: "sitting", 3: "standing", 4: "walking", 5: "running", 6: "cycling",
              7: "nordic walking", 9: "watching tv", 10: "computer work", 11: "car driving",
              12: "ascending stairs", 13: "descending stairs", 16: "vacuum cleaning", 17: "ironing",
              18: "folding laundry", 19: "house cleaning", 20: "playing soccer", 24: "rope jumping"}
COLUMNS = 54
IMUS = {"hand": 3, "chest": 20, "ankle": 37}  # each IMU's first column (its temperature)
ACC16, GYRO = 1, 7  # offsets of the ±16 g acceleration and the gyroscope within an IMU's columns


def files(path: str) -> list[Path]:
    """The .dat files `data.path` names (a file, a folder, a glob); UserError if none."""
    p = Path(path)
    found = sorted(p.glob("*.dat")) if p.is_dir() else [p] if p.is_file() else sorted(map(Path, glob.glob(path)))
    if not found:
        raise UserError(f"data.path={path}: no PAMAP2 .dat file there (a file, a folder of *.dat, or a glob)")
    return found


def channels(imus: list[str]) -> list[int]:
    """The columns read: ±16 g acceleration and gyroscope of each IMU, in order."""
    unknown = [name for name in imus if name not in IMUS]
    if unknown or not imus:
        raise UserError(f"data.imus={imus}: name one or more of {', '.join(IMUS)}")
    return [IMUS[name] + offset + axis for name in imus for offset in (ACC16, GYRO) for axis in range(3)]


def read_dat(file: Path, columns: list[int], downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """(activity id per step (T,), values (C, T) float32) of one file, averaged over `downsample`
    steps; a step whose lines are unreadable or of mixed activities gets id -1."""
    try:
        table = np.loadtxt(file, dtype=np.float64, usecols=[1, *columns], ndmin=2, encoding="utf-8")
    except (ValueError, UnicodeDecodeError):  # some line is not numbers: read line by line
        table = _read_lines(file, columns)
    activity = np.where(np.isfinite(table[:, 0]), np.nan_to_num(table[:, 0], nan=-1), -1).astype(np.int64)
    values = table[:, 1:].astype(np.float32)
    steps = len(table) // downsample
    activity, values = activity[: steps * downsample].reshape(steps, downsample), values[: steps * downsample]
    same = (activity == activity[:, :1]).all(1)
    with np.errstate(invalid="ignore"):  # a group of NaN stays NaN (a gap)
        mean = values.reshape(steps, downsample, -1).mean(1)
    return np.where(same, activity[:, 0], -1), np.ascontiguousarray(mean.T)


def _read_lines(file: Path, columns: list[int]) -> np.ndarray:
    """The activity and `columns` of every line; an unreadable line's activity is NaN (no
    window spans it), and their count is said once."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"data.path: {file} is not UTF-8 text") from None
    table, bad = np.full((len(lines), 1 + len(columns)), np.nan), 0
    for i, line in enumerate(lines):
        parts = line.split()
        try:
            if len(parts) != COLUMNS:
                raise ValueError
            table[i] = [float(parts[c]) for c in (1, *columns)]
        except ValueError:
            table[i], bad = np.nan, bad + 1
    print(f"graft: {file}: {bad} of {len(lines)} lines are not {COLUMNS} numbers (no window spans them)",
          file=sys.stderr)
    return table


@dataclass
class Window:
    file: int
    start: int
    activity: int


def windows(activity: np.ndarray, file: int, length: int, stride: int) -> list[Window]:
    """Windows of `length` steps every `stride` steps within each run of one known activity."""
    out = []
    edges = np.flatnonzero(np.diff(activity)) + 1
    for start, stop in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(activity)]])):
        if int(activity[start]) in ACTIVITIES:
            out += [Window(file, int(s), int(activity[start])) for s in range(start, stop - length + 1, stride)]
    return out


class Pamap2Source(IndexedSource):
    """The windows of the files `data.path` names, in a seeded permutation per epoch."""

    def __init__(self, d, length: int):
        self.seed, self.d, self.length = d.seed, d, length
        self.files = files(d.path)
        self.name = Path(d.path).name
        columns, stride = channels(d.imus), d.window_stride or length
        self.values, self.windows = [], []
        for i, file in enumerate(self.files):
            activity, values = read_dat(file, columns, d.downsample)
            self.values.append(values)
            self.windows += windows(activity, i, length, stride)

    def __len__(self) -> int:
        return len(self.windows)

    def key(self, raw: int) -> str:
        w = self.windows[raw]
        return f"{self.files[w.file].name}@{w.start}"

    def recording(self, raw: int) -> tuple[np.ndarray, str]:
        """Window `raw`: (C, series.length) values and its activity's name."""
        w = self.windows[raw]
        return self.values[w.file][:, w.start:w.start + self.length], ACTIVITIES[w.activity]

    def example(self, raw: int) -> Example:
        values, label = self.recording(raw)
        return Example(self.key(raw), [values], [(self.d.class_prompt, label)], ONE_IMAGE)
