"""`data.source` → the data a run trains on: the one registry of sources, and the trainer's entry points.

    shapes      the built-in world (stream.py; the position is the step, resume is bit-exact)
    webdataset  tar shards, one `data.shards` entry per source, mixed by `data.weights`
    llava       LLaVA conversation JSON (`data.path`) + image folder (`data.image_root`)
    hf          a Hugging Face dataset saved with `save_to_disk` (`data.path`, `data.*_column`)
    interleaved web documents, text and images in turn (OBELICS, MMC4): JSON Lines (`data.path`) or shards

To add a source: write a class with `epoch(epoch, slot, nslots, log)` (its raw records for one slot,
deterministic), `key(raw)` and `example(raw) -> samples.Example`, and add a builder here.
"""

from __future__ import annotations

from itertools import islice

from graft.config import Config, DataConfig
from graft.data.hf_dataset import HFSource
from graft.data.interleaved import InterleavedShards, JsonlDocuments
from graft.data.limits import bounded_turns
from graft.data.llava_json import LlavaSource
from graft.data.samples import BadSample
from graft.data.shapes import CAPTION_PROMPT
from graft.data.skips import SkipLog
from graft.data.webdataset import ShardSource


def _webdataset(d: DataConfig) -> list:
    return [ShardSource(pattern, i, d) for i, pattern in enumerate(d.shards)]


def _llava(d: DataConfig) -> list:
    return [LlavaSource(d)]


def _hf(d: DataConfig) -> list:
    return [HFSource(d)]


def _interleaved(d: DataConfig) -> list:
    if d.shards:
        return [InterleavedShards(pattern, i, d) for i, pattern in enumerate(d.shards)]
    return [JsonlDocuments(d)]


SOURCES = {"shapes": None, "webdataset": _webdataset, "llava": _llava, "hf": _hf, "interleaved": _interleaved}


def build_sources(d: DataConfig) -> tuple[list, list[float]]:
    sources = SOURCES[d.source](d)
    return sources, list(d.weights) if d.weights else [1.0] * len(sources)


def training_corpus(cfg: Config, per_source: int = 3000, max_bytes: int = 8 << 20) -> list[str]:
    """Text to train the tokenizer on: the first records' turns of each streaming source (the built-in
    world's tokenizer is trained once per process from its own text, build.tokenizer_for).

    Only texts within the data limits (limits.py) are kept, and at most `max_bytes` in all, so the
    tokenizer's training cost is bounded whatever the data holds."""
    texts, size = [CAPTION_PROMPT, cfg.data.caption_prompt], 0
    for source in build_sources(cfg.data)[0]:
        for raw in islice(source.epoch(0, 0, 1, SkipLog()), per_source):
            try:
                turns, _ = bounded_turns(source.example(raw).turns, cfg.data)
            except BadSample:
                continue  # counted and logged when training reads it
            texts += [t for turn in turns for t in turn]
            size += sum(len(q) + len(a) for q, a in turns)
            if size >= max_bytes:
                return texts
    return texts
