"""The built-in Shapes world's evaluation as one task of the registry (eval/tasks.py): `shapes`.

`--data` (or an `eval.splits` entry) is a split name. A VLM is scored on VQA per question type and,
with `eval.captions > 0`, on captions (CIDEr-D); a dual encoder on zero-shot classification and
image↔text retrieval. The sizes come from `eval.*` (vqa_per_type, captions, zeroshot_images,
retrieval_pairs). The world has no bad records, so the data set's `log` is None (no skip count).
"""

from __future__ import annotations

from dataclasses import dataclass

from graft.data.restyle import RESTYLED, RestyledWorld
from graft.data.shapes import SPLITS, ShapesWorld
from graft.errors import UserError
from graft.designs import CAPTIONS, design
from graft.eval.captioning import caption_cider, captioner_cider
from graft.eval.retrieval import retrieval
from graft.eval.vqa import vqa_accuracy
from graft.eval.zero_shot import zero_shot

WORLD = "shapes"
EVAL_SPLITS = (*SPLITS, RESTYLED)  # restyled: the test scenes drawn by another renderer (data/restyle.py)


@dataclass
class WorldSplit:
    name: str  # the split
    world: ShapesWorld  # or another built-in world with splits of samples (data/motion.py's MotionWorld)
    log: None = None  # a built-in world has no bad records to count


def load_split(split: str, cfg, splits: tuple[str, ...] = SPLITS) -> WorldSplit:
    if split not in splits:
        raise UserError(f"--data {split!r}: the {WORLD} task takes a split of the built-in world ({', '.join(splits)})")
    d = cfg.data
    return WorldSplit(split, RestyledWorld(cfg.vision.image_size, d.grid, d.max_objects, d.seed))


def load_eval_split(split: str, cfg) -> WorldSplit:
    """`load_split`, also taking `restyled`: the `shapes` task's own splits."""
    return load_split(split, cfg, EVAL_SPLITS)


def world_vlm(model, proc, data: WorldSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    e = cfg.eval
    metrics, predictions = vqa_accuracy(model, proc, data.world, data.name, e.vqa_per_type, e.batch_size)
    if e.captions > 0:
        more, captions = caption_cider(model, proc, data.world, data.name, e.captions, e.batch_size, e.max_new_tokens)
        metrics, predictions = metrics | more, predictions + captions
    return metrics, predictions


def world_dual(model, proc, data: WorldSplit, cfg) -> tuple[dict[str, float], list[dict]]:
    """Zero-shot top-1/top-5 and image↔text Recall@1/5/10; and CIDEr-D of its captions where the
    design also captions (CoCa) and `eval.captions > 0`."""
    e, metrics, predictions = cfg.eval, {}, []
    if e.zeroshot_images > 0:
        metrics, predictions = zero_shot(model, proc, data.world, data.name, e.zeroshot_images, e.zeroshot_file, e.batch_size)
    if e.retrieval_pairs > 0:
        more, pairs = retrieval(model, proc, data.world, data.name, e.retrieval_pairs, e.batch_size, e.itm_rerank)
        metrics, predictions = metrics | more, predictions + pairs
    if design(cfg.model).can(CAPTIONS) and e.captions > 0:
        more, captions = captioner_cider(model, proc, data.world, data.name, e.captions, e.batch_size)
        metrics, predictions = metrics | more, predictions + captions
    return metrics, predictions
