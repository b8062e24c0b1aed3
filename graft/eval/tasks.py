"""Evaluation tasks on a user's own data: `graft eval RUN --task NAME --data PATH [--set eval.KEY=...]`.

One registry entry per task (a `Task`): the run kind it needs, a loader (path, data config) → a
data set, and a scorer (model, processor, data set, config) → (metrics, predictions). A new task is
one loader, one scorer and one line in `TASKS`. The metrics go to `RUN/eval.json`, the per-example predictions (id, prediction, reference,
correct) to `RUN/eval_<task>.jsonl`. Today: `zeroshot` (eval/labelled.py) and `retrieval`
(eval/captioned.py) for dual encoders, `caption` (CIDEr-D, BLEU-4 on the same image–caption
layouts) and `vqa` (eval/questions.py: LLaVA-style JSON, exact match; VLMEvalKit TSV, multiple
choice) for VLMs. Not yet: VQAv2's soft accuracy over 10 human answers, zero-shot with a VLM, and
the built-in world's evaluations as entries of this registry (eval/harness.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from graft.data.skips import records_skipped
from graft.errors import UserError
from graft.eval.captioned import load_captioned
from graft.eval.captioning import caption_on
from graft.eval.labelled import load_labelled
from graft.eval.questions import load_questions
from graft.eval.retrieval import retrieval_on
from graft.eval.vqa import vqa_on
from graft.eval.zero_shot import zero_shot_on


@dataclass(frozen=True)
class Task:
    model: str  # the run kind it needs: "dual" (scores embeddings) or "vlm" (generates text)
    load: Callable  # (path, data config) → a data set with `.log` (records skipped while reading)
    score: Callable  # (model, processor, data set, config) → (metrics, predictions)


TASKS = {
    "zeroshot": Task("dual", load_labelled, zero_shot_on),
    "retrieval": Task("dual", load_captioned, retrieval_on),
    "caption": Task("vlm", load_captioned, caption_on),
    "vqa": Task("vlm", load_questions, vqa_on),
}
NEEDS = {"dual": "a dual-encoder run (clip, siglip, clippo, lit)", "vlm": "a VLM run (it generates text)"}


def run_task(name: str, model, proc, cfg, path: str) -> tuple[dict[str, float], list[dict]]:
    """Metrics (with `<name>_skipped`: records and images skipped as bad) and per-example predictions."""
    if name not in TASKS:
        raise UserError(f"graft eval --task {name!r}: unknown task (valid: {', '.join(TASKS)})")
    task = TASKS[name]
    if cfg.model != task.model:
        raise UserError(f"--task {name} needs {NEEDS[task.model]}; this run is model={cfg.model}")
    data = task.load(path, cfg.data)
    metrics, predictions = task.score(model, proc, data, cfg)
    return metrics | {f"{name}_skipped": records_skipped(data.log.skipped)}, predictions
