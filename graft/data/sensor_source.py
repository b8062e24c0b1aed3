"""`data.source=sensors`: the built-in sensor world (data/sensors.py) as a source, the way
`data.source=shapes` is the Shapes world (data/world_source.py).

Record `i` of a split is recording i, made into an `Example` whose one item is the recording (a
(6, L) array: `series.length` steps over 8 seconds) and whose turns are `data.questions_per_image`
of its questions in random order, sometimes with the caption request. It is indexed (record i is a
pure function of i: read by number, resumed exactly, packable) and its tokenizer is trained on the
world's own text, with the `<series>` placeholder among its special tokens.
"""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer

from graft.config import Config
from graft.data.samples import ONE_IMAGE, Example
from graft.data.sensors import RECORDING_PROMPT, SensorWorld
from graft.data.tokenizer import ChatTokenizer
from graft.data.world_source import BuiltInSource, training_turns
from graft.errors import UserError
from graft.models.modality import TIME_SERIES

SECONDS = 8  # every recording's duration; series.length steps over it set the sampling rate


def make_sensor_world(cfg: Config) -> SensorWorld:
    return SensorWorld(SECONDS, cfg.series.length // SECONDS, cfg.data.seed)


def check(cfg: Config) -> None:
    s = cfg.series
    if s.length % SECONDS or s.length < 8 * SECONDS:
        raise UserError(f"series.length={s.length}: the sensor world's {SECONDS}-second recordings need a multiple "
                        f"of {SECONDS} of at least {8 * SECONDS} steps (8 Hz)")
    if s.channels != 6:
        raise UserError(f"series.channels={s.channels}: the sensor world records 6 (3-axis accelerometer and gyroscope)")


class SensorSource(BuiltInSource):
    """Recordings 0, 1, 2, … of a split of the sensor world, as examples for `proc`."""

    def __init__(self, cfg: Config, proc=None, split: str = "train"):
        super().__init__(make_sensor_world(cfg), cfg, proc, split)

    def example(self, index: int) -> Example:
        rec, key = self.world.sample(self.split, index), self.key(index)
        if self.captions:
            return Example(key, [rec.values], [(RECORDING_PROMPT, rec.caption)], ONE_IMAGE)
        rng = random.Random(f"turns/{self.d.seed}/{index}")
        turns = training_turns(rec, rng, self.d.questions_per_image, self.d.caption_prob, RECORDING_PROMPT)
        return Example(key, [rec.values], turns, ONE_IMAGE)


def sensor_tokenizer(cfg: Config) -> ChatTokenizer:
    return ChatTokenizer(Tokenizer.from_str(_sensor_tokenizer(cfg.data.seed, cfg.data.vocab_size)))


@functools.lru_cache(maxsize=4)
def _sensor_tokenizer(seed: int, vocab_size: int, n: int = 2000) -> str:
    """As JSON, trained once per process on the world's captions, questions and answers."""
    world, texts = SensorWorld(SECONDS, 16, seed, gap_prob=0.0), [RECORDING_PROMPT]
    for i in range(n):
        rec = world.sample("train", i)
        texts += [rec.caption] + [t for qa in rec.qa for t in (qa.question, qa.answer)]
    return ChatTokenizer.train(texts, vocab_size, extra=(TIME_SERIES.token,)).tok.to_str()
