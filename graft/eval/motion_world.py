"""The built-in world in motion's evaluation as one task of the registry (eval/tasks.py): `motion`.

`--data` (or an `eval.splits` entry of a run on `data.source=motion`) is a split of the world
(data/motion.py). A VLM is scored on question answering per question type (`vqa_acc`,
`vqa_acc/direction`, `vqa_acc/order`, ...; `eval.vqa_per_type` questions of each type, every clip's
frames in order before the question, as training lays them out) and, with `eval.captions` > 0, on its answers to "describe
the clip." against the world's captions (`caption_cider`, `caption_exact`).
"""

from __future__ import annotations

from graft.data.motion import CLIP_PROMPT, QUESTION_TYPES, SPLITS
from graft.data.motion_source import make_motion_world, pose
from graft.errors import UserError
from graft.eval.captioning import caption_cider
from graft.eval.vqa import vqa_accuracy
from graft.eval.world import WorldSplit

MOTION_WORLD = "motion"


def load_motion_split(split: str, cfg) -> WorldSplit:
    if split not in SPLITS:
        raise UserError(f"--data {split!r}: the {MOTION_WORLD} task takes a split of the motion world ({', '.join(SPLITS)})")
    return WorldSplit(split, make_motion_world(cfg))


def motion_vlm(model, proc, data: WorldSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e, frames = cfg.eval, pose(cfg)
    metrics, predictions = vqa_accuracy(model, proc, data.world, data.name, e.vqa_per_type, e.batch_size,
                                        QUESTION_TYPES, pose=frames)
    if e.captions > 0:
        more, captions = caption_cider(model, proc, data.world, data.name, e.captions, e.batch_size, e.max_new_tokens,
                                       CLIP_PROMPT, pose=frames)
        metrics, predictions = metrics | more, predictions + captions
    return metrics, predictions
