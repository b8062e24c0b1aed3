"""The registry of evaluation tasks: `graft eval RUN --task NAME --data PATH [--data PATH2] [--set eval.KEY=...]`,
`eval.tasks: [NAME=PATH, ...]` at training time, and the built-in world's evaluation (`shapes`).

One entry per task (a `Task`): a loader (path, config) → a data set, and one scorer per capability
it can score (graft/designs/) — EMBEDS (similarity of embeddings) and/or GENERATES (text
likelihoods and generation) — each (model, processor, data set, config) → (metrics, per-example
predictions); a run is scored by the first scorer whose capability its design has. A new
task is one loader, its scorers and one line in `TASKS`. The harness (eval/harness.py) writes the
metrics to `RUN/eval.json` and the predictions (id, prediction, reference, correct) to
`RUN/eval_<task>.jsonl`.

- `shapes` (eval/world.py): the built-in world; `--data` is a split (test, val, compositional,
  train, or restyled: the test scenes drawn by a second renderer, data/restyle.py).
- `sensors` (eval/sensor_world.py): the built-in sensor world (series QA, activity F1); `--data` is a split.
- `motion` (eval/motion_world.py): the built-in world in motion (clip QA per type); `--data` is a split.
- `fewshot`, `documents` (eval/fewshot.py): the world in context — k-shot VQA and captioning
  (k in `eval.shots`), and questions across the images of interleaved documents; `--data` is a split.
- `text` (eval/text_world.py): the world's questions about scenes told in words, no image: held-out
  text loss and accuracy of the language side; `--data` is a split.
- `zeroshot` (eval/labelled.py): a folder per class or CLIP_benchmark shards; dual encoders by
  embedding similarity (eval/zero_shot.py), VLMs by the likelihood of each class name (eval/class_scores.py).
- `retrieval` (eval/captioned.py): image–caption shards, COCO or Karpathy JSON; dual encoders.
- `caption` (the same layouts): CIDEr-D and BLEU-4 of a VLM's captions.
- `classify` (eval/series_classes.py): a UEA/UCR `.ts` file or an arrays folder; a VLM on series answers `data.class_prompt`
  (accuracy, macro-F1, recall per label).
- `vqa` (eval/questions.py): LLaVA-style JSON (exact match), VLMEvalKit TSV (multiple choice),
  VQAv2 questions + annotations JSON (soft accuracy over 10 human answers, eval/vqav2.py).
"""

from __future__ import annotations

import glob

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graft.data.motion import SPLITS as MOTION_SPLITS
from graft.data.sensors import SPLITS as SENSOR_SPLITS
from graft.data.shapes import SPLITS
from graft.data.skips import records_skipped
from graft.data.sources import source_kind
from graft.designs import CAPABILITIES, CAPTIONS, EMBEDS, GENERATES, design
from graft.errors import UserError
from graft.eval.captioned import load_captioned
from graft.eval.captioning import caption_on, captioner_on
from graft.eval.class_scores import zero_shot_vlm
from graft.eval.fewshot import documents_vlm, fewshot_vlm
from graft.eval.labelled import load_labelled
from graft.eval.questions import load_questions
from graft.eval.motion_world import MOTION_WORLD, load_motion_split, motion_vlm
from graft.eval.retrieval import retrieval_on
from graft.eval.sensor_world import sensors_dual, SENSOR_WORLD, load_sensor_split, sensors_vlm
from graft.eval.series_classes import classify_vlm, load_series
from graft.eval.text_world import text_vlm
from graft.eval.vqa import vqa_on
from graft.eval.world import EVAL_SPLITS, WORLD, load_eval_split, load_split, world_dual, world_vlm
from graft.eval.zero_shot import zero_shot_on
from graft.models.modality import TIME_SERIES


@dataclass(frozen=True)
class Task:
    load: Callable  # (path, config) → a data set with `.name` and `.log` (records skipped while reading, or None)
    # capability (designs.GENERATES | EMBEDS) → (model, processor, data set, config) → (metrics, predictions);
    # a design that has several capabilities is scored by the first scorer here that it can use
    score: dict[str, Callable]
    exists: Callable[[str], bool] = lambda path: "{" in path or Path(path).exists()  # checked before training
    splits: tuple[str, ...] = ()  # a built-in world's task: its splits (`eval.splits` of a run on it)
    modality: str = "image"  # what its data's items are: a run must read the same (models/modality.py)


TASKS = {
    WORLD: Task(load_eval_split, {GENERATES: world_vlm, EMBEDS: world_dual}, exists=lambda split: split in EVAL_SPLITS,
                splits=EVAL_SPLITS),
    SENSOR_WORLD: Task(load_sensor_split, {GENERATES: sensors_vlm, EMBEDS: sensors_dual}, exists=lambda split: split in SENSOR_SPLITS,
                       splits=SENSOR_SPLITS, modality=TIME_SERIES.name),
    MOTION_WORLD: Task(load_motion_split, {GENERATES: motion_vlm}, exists=lambda split: split in MOTION_SPLITS,
                       splits=MOTION_SPLITS),
    "fewshot": Task(load_split, {GENERATES: fewshot_vlm}, exists=lambda split: split in SPLITS),
    "documents": Task(load_split, {GENERATES: documents_vlm}, exists=lambda split: split in SPLITS),
    "text": Task(load_split, {GENERATES: text_vlm}, exists=lambda split: split in SPLITS),
    "zeroshot": Task(load_labelled, {EMBEDS: zero_shot_on, GENERATES: zero_shot_vlm}),
    "retrieval": Task(load_captioned, {EMBEDS: retrieval_on}),
    "caption": Task(load_captioned, {GENERATES: caption_on, CAPTIONS: captioner_on}),
    "vqa": Task(load_questions, {GENERATES: vqa_on}),
    "classify": Task(load_series, {GENERATES: classify_vlm}, modality=TIME_SERIES.name,
                     exists=lambda path: bool(glob.glob(path))),
}


def scorer(task: Task, model: str) -> Callable | None:
    """The first of `task`'s scorers whose capability design `model` has, or None."""
    return next((fn for capability, fn in task.score.items() if design(model).can(capability)), None)


def check_task(name: str, model: str, where: str, modality: str = "image") -> Task:
    """The task `name`, if it can score a run of this design (`model`) reading items of `modality`;
    else a one-line UserError."""
    if name not in TASKS:
        raise UserError(f"{where}: unknown task {name!r} (valid: {', '.join(TASKS)})")
    task = TASKS[name]
    if task.modality != modality:
        raise UserError(f"{where}: {name} scores a run that reads {task.modality} items; this run reads {modality}")
    if scorer(task, model) is None:
        raise UserError(f"{where}: {name} needs {' or '.join(CAPABILITIES[c] for c in task.score)}; "
                        f"this run is model={model}")
    return task


def run_task(name: str, model, proc, cfg, path: str) -> tuple[dict[str, float], list[dict]]:
    """Metrics (with `<name>_skipped`: records and images skipped as bad) and per-example predictions."""
    task = check_task(name, cfg.model, f"--task {name}", source_kind(cfg).modality.name)
    data = task.load(path, cfg)
    metrics, predictions = scorer(task, cfg.model)(model, proc, data, cfg)
    if data.log is not None:
        metrics |= {f"{name}_skipped": records_skipped(data.log.skipped)}
    return metrics, predictions
