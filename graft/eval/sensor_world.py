"""The built-in sensor world's evaluation as one task of the registry (eval/tasks.py): `sensors`.

`--data` (or an `eval.splits` entry of a run on `data.source=sensors`) is a split; `test` holds out
the people of the training splits (data/sensors.py). A VLM is scored on question answering per
question type (`vqa_acc`, `vqa_acc/activity`, ...; `eval.vqa_per_type` questions of each type) and,
from its answers to "what is the person doing?", on activity classification: macro-F1 over the
activities, their mean recall (balanced accuracy) and each one's (`activity_f1`, `activity_recall`,
`activity_recall/walking`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from graft.data.sensor_source import make_sensor_world
from graft.data.sensors import ACTIVITIES, ACTIVITY_PROMPT, QUESTION_TYPES, SPLITS, SensorWorld
from graft.errors import UserError
from graft.eval.series_classes import class_scores
from graft.eval.vqa import normalise, vqa_accuracy

SENSOR_WORLD = "sensors"


@dataclass
class SensorSplit:
    name: str
    world: SensorWorld
    log: None = None  # the world has no bad records to count


def load_sensor_split(split: str, cfg) -> SensorSplit:
    if split not in SPLITS:
        raise UserError(f"--data {split!r}: the {SENSOR_WORLD} task takes a split of the sensor world ({', '.join(SPLITS)})")
    return SensorSplit(split, make_sensor_world(cfg))


def sensors_vlm(model, proc, data: SensorSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e = cfg.eval
    metrics, predictions = vqa_accuracy(model, proc, data.world, data.name, e.vqa_per_type, e.batch_size,
                                        QUESTION_TYPES, item=lambda rec: rec.values)
    asked = [(normalise(p["reference"]), normalise(p["prediction"])) for p in predictions if p["question"] == ACTIVITY_PROMPT]
    return metrics | class_scores(asked, ACTIVITIES, "activity"), predictions
