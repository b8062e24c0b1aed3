"""The training stream: which samples make up step s's batch, as a pure function of s.

Batch of step s on rank r holds world samples s·B·W + r·B + [0, B) of the train split, so resuming
needs nothing but the step (the "data position" is step x global batch; a run resumed on another
number of processes continues from the samples it had seen, `first_sample`). Each sample becomes a
conversation of `questions_per_image` of its questions in random order, sometimes with the
caption request, so one image encoding supervises several answers. With `data.images_per_doc` > 1
each item is instead an interleaved document of that many images (data/documents.py); with
`data.text_only` a conversation about the scene told in words, without the image (`in_words`).
"""

from __future__ import annotations

import random

from graft.config import Config
from graft.data.documents import document
from graft.data.packing import pack
from graft.data.processor import Processor, collate
from graft.data.shapes import CAPTION_PROMPT, Sample, ShapesWorld

SCENE_PREFIX = "the scene: "


def first_sample(step: int, micro: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 base: tuple[int, int] = (0, 0)) -> int:
    """Index of the first sample of micro-batch `micro` of `step` on `rank`. `base` = (step, samples
    seen by then): a run resumed on another number of processes continues from where it was."""
    base_step, base_samples = base
    return (base_samples + (step - base_step) * batch_size * world_size + rank * batch_size
            + micro * (batch_size // grad_accum))


def make_world(cfg: Config) -> ShapesWorld:
    d = cfg.data
    return ShapesWorld(cfg.vision.image_size, d.grid, d.max_objects, d.seed)


def training_turns(sample: Sample, rng: random.Random, questions: int, caption_prob: float) -> list[tuple[str, str]]:
    turns = [(qa.question, qa.answer) for qa in rng.sample(sample.qa, min(questions, len(sample.qa)))]
    if rng.random() < caption_prob:
        turns.insert(rng.randint(0, len(turns)), (CAPTION_PROMPT, sample.caption))
    return turns


def in_words(sample: Sample, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`turns` about `sample` with the scene told in words (its caption) before the first question:
    `data.text_only`'s conversations and the `text` evaluation's (eval/text_world.py)."""
    (question, answer), rest = turns[0], turns[1:]
    return [(f"{SCENE_PREFIX}{sample.caption}. {question}", answer), *rest]


class TrainStream:
    """The built-in world's training conversations as micro-batches; `packs`: several conversations
    per row (designs.uses_packing decides it for a run)."""

    def __init__(self, cfg: Config, processor: Processor, rank: int = 0, world_size: int = 1, *, packs: bool):
        self.cfg, self.proc, self.rank, self.world_size = cfg, processor, rank, world_size
        self.world = make_world(cfg)
        self.packs = packs
        self.base = (0, 0)  # (step, samples seen): see first_sample

    def batch(self, step: int, micro: int) -> dict:
        """Micro-batch `micro` of step `step` for this rank."""
        b, accum = self.cfg.train.batch_size, self.cfg.train.grad_accum
        start = first_sample(step, micro, b, accum, self.rank, self.world_size, self.base)
        items = [self.item(i) for i in range(start, start + b // accum)]
        if self.packs:
            return pack(items, self.proc.tok.pad, self.cfg.lm.max_seq_len, self.proc.image_size)
        return collate(items, self.proc.tok.pad, self.proc.image_size)

    def item(self, index: int):
        d = self.cfg.data
        if d.images_per_doc > 1:
            doc = document(self.world, "train", index, d.images_per_doc, d.questions_per_image, d.caption_prob)
            ids, labels = self.proc.conversation(doc.turns, doc.places)
            kept = ids.count(self.proc.tok.image) // self.proc.num_image_tokens  # turns past max_seq_len go whole
            return ids, labels, [self.proc.pixels(s.image) for s in doc.samples[:kept]]
        sample = self.world.sample("train", index)
        rng = random.Random(f"turns/{d.seed}/{index}")
        if d.text_only:  # the scene in words, no image (and no caption request: it would be a copy)
            turns = in_words(sample, training_turns(sample, rng, d.questions_per_image, 0.0))
            return *self.proc.conversation(turns, []), []
        ids, labels = self.proc.conversation(training_turns(sample, rng, d.questions_per_image, d.caption_prob))
        return ids, labels, self.proc.pixels(sample.image)
