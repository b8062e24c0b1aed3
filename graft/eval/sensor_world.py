"""The built-in sensor world's evaluation as one task of the registry (eval/tasks.py): `sensors`.

`--data` (or an `eval.splits` entry of a run on `data.source=sensors`) is a split; `test` holds out
the people of the training splits (data/sensors.py). A VLM is scored on question answering per
question type (`vqa_acc`, `vqa_acc/activity`, ...; `eval.vqa_per_type` questions of each type) and,
from its answers to "what is the person doing?", on activity classification: macro-F1 over the
activities, their mean recall (balanced accuracy) and each one's (`activity_f1`, `activity_recall`,
`activity_recall/walking`, ...), and with `eval.captions` > 0 on its answers to "describe the
recording." against the world's captions (`caption_cider`, `caption_exact`). A dual encoder (series–text) is scored on zero-shot activity
classification — each of `eval.zeroshot_images` one-activity recordings against the captions "the
person was <activity>", the world's own wording (`zeroshot_acc`, and `activity_f1`, `activity_recall`,
per activity) — and on retrieval between `eval.retrieval_pairs` recordings and their captions
(`i2t_r@1/5/10`, `t2i_r@...`; a caption shared by several recordings counts for each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graft.data.sensor_source import make_sensor_world
from graft.data.sensors import ACTIVITIES, ACTIVITY_PROMPT, QUESTION_TYPES, RECORDING_PROMPT, SPLITS, SensorWorld, caption
from graft.errors import UserError
from graft.eval.captioning import caption_cider
from graft.eval.retrieval import recall_at_k
from graft.eval.series_classes import class_scores
from graft.eval.zero_shot import embed_images, embed_texts
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


def sensors_dual(model, proc, data: SensorSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e, world, split = cfg.eval, data.world, data.name
    metrics, predictions = {}, []
    if e.zeroshot_images > 0:
        recs = [r for r in (world.sample(split, i) for i in range(4 * e.zeroshot_images)) if len(r.activities) == 1]
        recs = recs[: e.zeroshot_images]
        texts = [caption([(a, 0.0)]) for a in ACTIVITIES]
        sims = model.similarity(embed_images(model, proc, [r.values for r in recs], e.batch_size),
                                embed_texts(model, proc, texts, e.batch_size))
        said = [ACTIVITIES[j] for j in sims.argmax(1).tolist()]
        pairs = [(r.activities[0][0], p) for r, p in zip(recs, said)]
        metrics["zeroshot_acc"] = sum(t == p for t, p in pairs) / len(pairs)
        metrics |= class_scores(pairs, ACTIVITIES, "activity")
        predictions += [{"id": f"{split}/{i}", "prediction": p, "reference": t, "correct": t == p}
                        for i, (t, p) in enumerate(pairs)]
    if e.retrieval_pairs > 0:
        recs = [world.sample(split, i) for i in range(e.retrieval_pairs)]
        texts = [r.caption for r in recs]
        same = torch.tensor([[a == b for b in texts] for a in texts])
        sims = model.similarity(embed_images(model, proc, [r.values for r in recs], e.batch_size),
                                embed_texts(model, proc, texts, e.batch_size))
        for name, (s, m) in {"i2t": (sims, same), "t2i": (sims.T, same.T)}.items():
            metrics |= {f"{name}_r@{k}": v for k, v in recall_at_k(s, m).items()}
    return metrics, predictions


def sensors_vlm(model, proc, data: SensorSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e = cfg.eval
    metrics, predictions = vqa_accuracy(model, proc, data.world, data.name, e.vqa_per_type, e.batch_size,
                                        QUESTION_TYPES, pose=lambda rec, question: (rec.values, question))
    if e.captions > 0:  # "describe the recording." against the world's caption
        more, captions = caption_cider(model, proc, data.world, data.name, e.captions, e.batch_size, e.max_new_tokens,
                                       RECORDING_PROMPT, pose=lambda rec, question: (rec.values, question))
        metrics, predictions = metrics | more, predictions + captions
    asked = [(normalise(p["reference"]), normalise(p["prediction"])) for p in predictions if p["question"] == ACTIVITY_PROMPT]
    return metrics | class_scores(asked, ACTIVITIES, "activity"), predictions
