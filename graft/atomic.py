"""Whole-file writes: readers see the old file or the new one, never a half-written one.

The text goes to a temporary file beside the target, is flushed to disk, then renamed over the
target (`os.replace` is atomic within one filesystem). Checkpoint folders do the same with a
temporary folder (train/checkpoint.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
