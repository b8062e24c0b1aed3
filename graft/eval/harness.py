"""One evaluation entry point for training time and `graft eval`: a list of (task, data) entries,
each run through the task registry (eval/tasks.py).

The entries are the built-in world's splits (`eval.splits`, task `shapes`) followed by the user's
`eval.tasks` (`TASK=PATH`), or what `graft eval --task --data` names. Returns a flat dict. The
world's `test` split is unprefixed (`vqa_acc`, `vqa_acc/color`, `caption_cider`; for dual
encoders `zeroshot_acc`, `i2t_r@1`, ...), its other splits prefixed with their name
(`compositional/vqa_acc`). A user's task is unprefixed when it is the only entry, else prefixed
with its data's name (`pets/zeroshot_acc`). Per-example predictions go to
`OUT/eval_shapes_<split>.jsonl` for the world, `OUT/eval_<task>.jsonl` or `OUT/eval_<name>_<task>.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from graft import atomic
from graft.config import Config
from graft.data.sources import source_kind
from graft.eval.tasks import TASKS, run_task


def entries(cfg: Config) -> list[tuple[str, str]]:
    """The run's evaluations: (task, data) for each split of `eval.splits` (of the built-in world of
    the run's modality: `SourceKind.world`) and entry of `eval.tasks`."""
    world = source_kind(cfg).world
    return [(world, split) for split in cfg.eval.splits] + [tuple(t.split("=", 1)) for t in cfg.eval.tasks]


def on_splits(task: str) -> bool:
    """A built-in world's task: its data are splits."""
    return bool(TASKS[task].splits)


def prefix(task: str, data: str, alone: bool) -> str:
    if on_splits(task):
        return "" if data == "test" else f"{data}/"
    return "" if alone else f"{Path(data.rstrip('/')).name}/"


def unprefixed(todo: list[tuple[str, str]]) -> str:
    """The name of the data set whose metrics are unprefixed (a results table's first column)."""
    alone = len(todo) == 1
    return next((d if on_splits(t) else Path(d.rstrip("/")).name for t, d in todo if not prefix(t, d, alone)), "test")


@torch.no_grad()
def evaluate(model, proc, cfg: Config, todo: list[tuple[str, str]] | None = None, out: Path | None = None) -> dict[str, float]:
    """Metrics of every entry of `todo` (default: the run's own, `entries(cfg)`); predictions into `out`."""
    was_training = model.training
    model.eval()
    todo = entries(cfg) if todo is None else todo
    results: dict[str, float] = {}
    for task, data in todo:
        head = prefix(task, data, len(todo) == 1)
        metrics, predictions = run_task(task, model, proc, cfg, data)
        if out is not None:
            file = out / (f"eval_{task}_{data}.jsonl" if on_splits(task) else f"eval_{head.replace('/', '_')}{task}.jsonl")
            atomic.write_text(file, "".join(json.dumps(p) + "\n" for p in predictions))
        results |= {head + k: round(v, 4) for k, v in metrics.items()}
    model.train(was_training)
    return results
