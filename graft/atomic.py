"""Whole-file writes: readers see the old file or the new one, never a half-written one.

The text goes to a temporary file beside the target, is flushed to disk, then renamed over the
target (`os.replace` is atomic within one filesystem). Checkpoint folders and the HF tokenizer
folder do the same with a temporary folder (trainer/checkpoint.py, rundir.py). The two append-only
logs, `metrics.jsonl` and TensorBoard's events, are appended to instead; a line cut by a kill is
dropped when the file is read or the run resumes (trainer/metrics.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    _replace(Path(path), "w", text)


def write_bytes(path: str | Path, data: bytes) -> None:
    _replace(Path(path), "wb", data)


def _replace(path: Path, mode: str, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
