"""`data.source=motion`: the built-in world in motion (data/motion.py) as a source, the way
`data.source=shapes` is the still world (data/world_source.py).

Record `i` of a split is clip i, made into an `Example` whose items are its `data.frames` frames,
in order, at the start of the first question (as several images without markers go; with
`data.frame_labels` each after its timestamp, "frame 1: ... frame 2: ..."), and whose
turns are `data.questions_per_image` of its questions in random order, sometimes with the caption
request. It is indexed (record i is a pure function of i: read by number, resumed exactly,
packable) and its tokenizer is trained on the world's own text.
"""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer

from graft.config import Config
from graft.data.motion import CLIP_PROMPT, MotionWorld, timed
from graft.data.samples import Example
from graft.data.tokenizer import ChatTokenizer
from graft.data.world_source import BuiltInSource, training_turns
from graft.errors import UserError


def make_motion_world(cfg: Config) -> MotionWorld:
    d = cfg.data
    return MotionWorld(cfg.vision.image_size, d.grid, d.max_objects, d.frames, d.seed)


def check(cfg: Config) -> None:
    d = cfg.data
    if not 2 <= d.frames <= d.grid:
        raise UserError(f"data.frames={d.frames}: a clip of the motion world needs 2..data.grid ({d.grid}) frames "
                        "(an object moves one cell per frame)")
    if d.max_objects > 4:
        raise UserError(f"data.max_objects={d.max_objects}: the motion world keeps 1..4 objects apart on the board")


class MotionSource(BuiltInSource):
    """Clips 0, 1, 2, … of a split of the motion world, as examples for `proc`."""

    def __init__(self, cfg: Config, proc=None, split: str = "train"):
        super().__init__(make_motion_world(cfg), cfg, proc, split)  # a caption pairer is refused (config_checks)

    def example(self, index: int) -> Example:
        clip, key = self.world.sample(self.split, index), self.key(index)
        rng = random.Random(f"turns/{self.d.seed}/{index}")
        turns = training_turns(clip, rng, self.d.questions_per_image, self.d.caption_prob, CLIP_PROMPT)
        if self.d.frame_labels:
            first, at = timed(turns[0][0], len(clip.frames))
            return Example(key, list(clip.frames), [(first, turns[0][1]), *turns[1:]], [(0, o) for o in at])
        return Example(key, list(clip.frames), turns, [(0, 0)] * len(clip.frames))


def pose(cfg: Config):
    """(clip, question) → the prompt evaluation asks (eval/vqa.py `answer`): its frames laid out as
    training lays them out."""
    if cfg.data.frame_labels:
        return lambda clip, question: (clip.frames, *_timed(question, len(clip.frames)))
    return lambda clip, question: (clip.frames, question)


def _timed(question: str, frames: int) -> tuple[str, tuple, list[int]]:
    text, at = timed(question, frames)
    return text, ((), ()), at  # no earlier turns; the frames at `at`


def motion_tokenizer(cfg: Config) -> ChatTokenizer:
    d = cfg.data
    return ChatTokenizer(Tokenizer.from_str(_motion_tokenizer(d.seed, d.grid, d.max_objects, d.frames, d.vocab_size,
                                                              d.frame_labels)))


@functools.lru_cache(maxsize=4)
def _motion_tokenizer(seed: int, grid: int, max_objects: int, frames: int, vocab_size: int, labels: bool,
                      n: int = 2000) -> str:
    """As JSON, trained once per process on the world's captions, questions and answers (and the
    frames' timestamps, with `data.frame_labels`)."""
    world, texts = MotionWorld(8, grid, max_objects, frames, seed), [CLIP_PROMPT]
    if labels:
        texts.append(timed("", frames)[0])
    for i in range(n):
        caption, qa = world.text("train", i)
        texts += [caption] + [t for q in qa for t in (q.question, q.answer)]
    return ChatTokenizer.train(texts, vocab_size).tok.to_str()
