"""Metrics: `metrics.jsonl` (one JSON object per logged step or eval) and TensorBoard events.

On resume from step s, records after s are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from graft import atomic


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if _keep(l, resume_step)]
            atomic.write_text(self.path, "".join(l + "\n" for l in kept))  # a kill here keeps the old log
        try:
            # lazy: the run goes on without TensorBoard
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but the run should not die without it
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = "eval/" if record.get("event") == "eval" else "train/"
            for key, value in record.items():
                if key not in ("step", "event") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _keep(line: str, resume_step: int) -> bool:
    try:
        return json.loads(line).get("step", 0) <= resume_step
    except json.JSONDecodeError:  # a line cut short by a kill
        return False


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip() and _keep(l, math.inf)]
