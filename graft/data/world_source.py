"""`data.source=shapes`: the built-in world as a source like the others.

Its record `i` is sample i of a split (data/shapes.py), made into an `Example` the way every
source's records are (data/samples.py), so it reaches the model through the same processor and
checks (`streaming.read_record`). Two things set it apart, and both are its own properties rather
than branches elsewhere (data/sources.py registers them):

- it is *indexed*: record i is a pure function of i, so the trainer reads step s's records by
  number (data/stream.py): resume is bit-exact at any world size, and whole conversations can be
  packed into rows;
- its text is known in advance, so its tokenizer is trained from the world's own text, once per
  process (`world_tokenizer`), not from the first records.

An example is a conversation of `data.questions_per_image` of the sample's questions in random
order, sometimes with the caption request, so one image encoding supervises several answers; with
`data.images_per_doc` > 1 an interleaved document of that many images (data/documents.py); with
`data.text_only` a conversation about the scene told in words, without the image (`in_words`).
A processor that reads (image, caption) pairs (`Processor.reads_captions`: a dual encoder's) gets the
sample's caption instead.
"""

from __future__ import annotations

import functools
import random
from itertools import count

from tokenizers import Tokenizer

from graft.config import Config
from graft.data.cells import cell_classes
from graft.data.contrastive import pair_text
from graft.data.documents import document
from graft.data.grounding import compared_turns, grounded_questions, grounded_turns, more_spatial
from graft.data.samples import ONE_IMAGE, Example
from graft.data.shapes import CAPTION_PROMPT, Sample, ShapesWorld
from graft.data.tokenizer import ChatTokenizer, world_corpus

SCENE_PREFIX = "the scene: "
# Zero-shot prompts for a class name ("red circle") in the captions' words. The captions always name
# the size ("a small red circle"), so the templates do too and the ensemble covers both sizes.
# Measured on a 600-step `clip` run: "a {}" alone 0.72, these two 0.84, all three 0.79 zero-shot top-1.
LABEL_TEMPLATES = ("a small {}", "a large {}")


def make_world(cfg: Config) -> ShapesWorld:
    d = cfg.data
    return ShapesWorld(cfg.vision.image_size, d.grid, d.max_objects, d.seed)


def training_turns(sample: Sample, rng: random.Random, questions: int, caption_prob: float,
                   prompt: str = CAPTION_PROMPT) -> list[tuple[str, str]]:
    """`questions` of the sample's questions in random order, and with `caption_prob` the caption
    request (`prompt`) somewhere among them."""
    turns = [(qa.question, qa.answer) for qa in rng.sample(sample.qa, min(questions, len(sample.qa)))]
    if rng.random() < caption_prob:
        turns.insert(rng.randint(0, len(turns)), (prompt, sample.caption))
    return turns


def in_words(sample: Sample, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`turns` about `sample` with the scene told in words (its caption) before the first question:
    `data.text_only`'s conversations and the `text` evaluation's (eval/text_world.py)."""
    (question, answer), rest = turns[0], turns[1:]
    return [(f"{SCENE_PREFIX}{sample.caption}. {question}", answer), *rest]


class BuiltInSource:
    """Records 0, 1, 2, … of a split of a built-in world (`world`), as examples for `proc`. A record
    is its index; a processor that `reads_captions` gets (item, caption) pairs."""

    indexed = True

    def __init__(self, world, cfg: Config, proc=None, split: str = "train"):
        self.world, self.d, self.split = world, cfg.data, split
        self.captions = proc is not None and proc.reads_captions

    def epoch(self, epoch: int, slot: int, nslots: int, log=None):
        """This slot's records: every `nslots`-th index from `slot` (the world has no end)."""
        return count(slot, nslots)

    def key(self, index: int) -> str:
        return f"{self.split} #{index}"


class WorldSource(BuiltInSource):
    """The Shapes world's records (see the module docstring)."""

    def __init__(self, cfg: Config, proc=None, split: str = "train"):
        super().__init__(make_world(cfg), cfg, proc, split)

    def example(self, index: int) -> Example:
        d, key = self.d, self.key(index)
        if d.images_per_doc > 1:
            doc = document(self.world, self.split, index, d.images_per_doc, d.questions_per_image, d.caption_prob)
            return Example(key, [s.image for s in doc.samples], doc.turns, doc.places)
        sample = self.world.sample(self.split, index)
        if self.captions:
            return Example(key, [sample.image], [(CAPTION_PROMPT, pair_text(sample))], ONE_IMAGE)
        rng = random.Random(f"turns/{d.seed}/{index}")
        if d.text_only:  # the scene in words, no image (and no caption request: it would be a copy)
            return Example(key, [], in_words(sample, training_turns(sample, rng, d.questions_per_image, 0.0)), [])
        turns = training_turns(sample, rng, d.questions_per_image, d.caption_prob)
        if d.spatial_questions and self.split == "train":  # its own draws, as grounding's
            turns = more_spatial(sample, turns, d.spatial_questions, random.Random(f"spatial/{d.seed}/{index}"))
        if d.spatial_compare and self.split == "train":  # before grounding, which keeps the targets
            turns = compared_turns(sample, turns)
        if d.grounded_spatial and self.split == "train":  # its own draws: the other turns stay as they were
            turns = grounded_turns(sample, turns, d.grounded_spatial, random.Random(f"grounded/{d.seed}/{index}"))
        cells = [cell_classes(sample, d.grid)] if d.cell_targets and self.split == "train" else None
        return Example(key, [sample.image], turns, ONE_IMAGE, cells)


def world_tokenizer(cfg: Config) -> ChatTokenizer:
    """The BPE trained on the world's text (which depends on these settings alone, not the image size;
    with grounded spatial questions, their location words too)."""
    d = cfg.data
    return ChatTokenizer(Tokenizer.from_str(_world_tokenizer(d.seed, d.grid, d.max_objects, d.images_per_doc,
                                                             d.vocab_size, d.grounded_spatial > 0)))


@functools.lru_cache(maxsize=8)
def _world_tokenizer(seed: int, grid: int, max_objects: int, images_per_doc: int, vocab_size: int,
                     grounded: bool = False) -> str:
    """As JSON, trained once per process (`graft compare` and the tests build many runs in one)."""
    world = ShapesWorld(grid=grid, max_objects=max_objects, seed=seed)
    corpus = world_corpus(world, images_per_doc=images_per_doc)
    if grounded:
        samples = (world.sample("train", i) for i in range(3000))
        corpus += [q for s in samples for q in grounded_questions(s.qa, s.objects)]
    return ChatTokenizer.train(corpus, vocab_size).tok.to_str()
