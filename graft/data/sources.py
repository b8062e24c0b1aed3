"""`data.source` → the data a run trains on: the one registry of sources, and the trainer's entry points.

    shapes      the built-in world (world_source.py): indexed, its own tokenizer, its own settings
    noisy       the built-in world's training pool as web pairs are, with recorded noise (noisy_world.py)
    motion      the built-in world in motion (motion_source.py): clips of `data.frames` frames, each an image
    sensors     the built-in sensor world (sensor_source.py): recordings of activities, a series each
    webdataset  tar shards, one `data.shards` entry per source, mixed by `data.weights`
    llava       LLaVA conversation JSON (`data.path`) + image folder (`data.image_root`)
    hf          a Hugging Face dataset saved with `save_to_disk` (`data.path`, `data.*_column`)
    interleaved web documents, text and images in turn (OBELICS, MMC4): JSON Lines (`data.path`) or shards
    ts          a UEA/UCR time-series classification file (`data.path`, ts_file.py): series with labels
    arrays      a folder of series.npy + labels.txt, or *.csv + labels.csv (series_arrays.py)
    series_shards  tar shards of KEY.npy + KEY.cls/.txt/.json (series_shards.py), like webdataset's
    pamap2      PAMAP2 .dat files (`data.path`, pamap2.py), cut into windows of one activity

To add a source: write a class with `epoch(epoch, slot, nslots, log)` (its raw records for one slot,
deterministic), `key(raw)` and `example(raw) -> samples.Example`, and register a `SourceKind` here.
Every source's records become rows through `streaming.read_record`; an *indexed* source (record i
a pure function of i) is read by number (data/stream.py), the others by DataLoader workers
(data/streaming.py, data/loader.py). What sets a source apart is a field of its `SourceKind`, so
no other file decides by a source's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from graft.config import Config, DataConfig
from graft.data.hf_dataset import HFSource
from graft.data.interleaved import InterleavedShards, JsonlDocuments
from graft.data.limits import bounded_turns
from graft.data import pamap2
from graft.data.llava_json import LlavaSource
from graft.data.motion import SPLITS as MOTION_SPLITS
from graft.data.motion_source import MotionSource, motion_tokenizer
from graft.data.motion_source import check as check_motion
from graft.data.noisy_world import NoisySource, noise_shares
from graft.data.pamap2 import Pamap2Source
from graft.data.samples import BadSample
from graft.data.series_arrays import ArraySource, read_folder
from graft.data.series_shards import SeriesShards
from graft.data.sensor_source import SensorSource, sensor_tokenizer
from graft.data.sensor_source import check as check_sensors
from graft.data.sensors import SPLITS as SENSOR_SPLITS
from graft.data.shapes import CAPTION_PROMPT, SPLITS
from graft.data.skips import SkipLog
from graft.data.tokenizer import ChatTokenizer
from graft.data.ts_file import TsSource, read_header
from graft.data.webdataset import ShardSource
from graft.data.world_source import LABEL_TEMPLATES, WorldSource, make_world, world_tokenizer
from graft.models.connectors import per_patch
from graft.models.modality import IMAGES, TIME_SERIES, Modality
from graft.errors import UserError


def _webdataset(cfg: Config, proc, split: str) -> list:
    return [ShardSource(pattern, i, cfg.data) for i, pattern in enumerate(cfg.data.shards)]


def _interleaved(cfg: Config, proc, split: str) -> list:
    d = cfg.data
    if d.shards:
        return [InterleavedShards(pattern, i, d) for i, pattern in enumerate(d.shards)]
    return [JsonlDocuments(d)]


def _trained_tokenizer(cfg: Config) -> ChatTokenizer:
    """A BPE on the first records' text, with the placeholder of the source's items if not <image>."""
    modality = source_kind(cfg).modality
    return ChatTokenizer.train(training_corpus(cfg), cfg.data.vocab_size, () if modality is IMAGES else (modality.token,))


def _check_ts(cfg: Config) -> None:
    """A .ts file whose header declares what the series tower reads (`series.channels`, `.length`),
    and no built-in world's splits to evaluate on."""
    _needs_path(cfg)
    header, _, _ = read_header(Path(cfg.data.path))  # the header only: validation runs often
    if "dimensions" in header and header["dimensions"] != str(cfg.series.channels):
        raise UserError(f"series.channels={cfg.series.channels}, but {cfg.data.path} declares @dimensions "
                        f"{header['dimensions']}")
    if header.get("serieslength", "").isdigit():
        _check_steps(cfg, int(header["serieslength"]), f"{cfg.data.path} declares @seriesLength")
    _no_world(cfg)


def _check_steps(cfg: Config, steps: int, what: str) -> None:
    """Recordings of `steps` steps fit the series tower: at most series.length, and exactly that
    unless the connector maps each patch on its own and the tower reads any length
    (data/series_processor.py; a design's own one-length reasons are checked per record)."""
    s = cfg.series
    why = s.one_length() or (None if per_patch(cfg.connector.kind) else f"connector.kind={cfg.connector.kind} reads one length")
    if steps > s.length or (steps != s.length and why):
        raise UserError(f"series.length={s.length}, but {what} {steps} steps" + ("" if steps > s.length else f" ({why})"))


def _check_arrays(cfg: Config) -> None:
    """A folder in one of the two layouts (series_arrays.py), and no built-in world's splits."""
    _needs_path(cfg)
    names, _, load = read_folder(Path(cfg.data.path))
    shape, s = load(names[0]).shape, cfg.series
    if (Path(cfg.data.path) / "series.npy").is_file():
        if s.channels not in shape:
            raise UserError(f"series.channels={s.channels}, but {cfg.data.path}/series.npy holds series of {shape}")
        _check_steps(cfg, shape[1] if shape[0] == s.channels else shape[0], f"{cfg.data.path}/series.npy holds")
    _no_world(cfg)


def _check_pamap2(cfg: Config) -> None:
    """Files to read, IMUs that give series.channels, a whole downsampling factor and stride."""
    _needs_path(cfg)
    d = cfg.data
    pamap2.files(d.path)
    if len(pamap2.channels(d.imus)) != cfg.series.channels:
        raise UserError(f"series.channels={cfg.series.channels}, but data.imus={d.imus} gives "
                        f"{len(pamap2.channels(d.imus))} channels (6 per IMU)")
    if d.downsample < 1 or d.window_stride < 0:
        raise UserError(f"data.downsample={d.downsample} must be >= 1 and data.window_stride={d.window_stride} >= 0")
    _no_world(cfg)


def _no_world(cfg: Config) -> None:
    if cfg.eval.splits:
        raise UserError(f"eval.splits={cfg.eval.splits}: data.source={cfg.data.source} has no built-in world to "
                        "split; evaluate with eval.tasks=[classify=PATH] (and eval.splits=[])")


def _needs_shards(cfg: Config) -> None:
    if not cfg.data.shards:
        raise UserError(f"data.source={cfg.data.source} needs data.shards (e.g. data.shards=data/shard-{{000000..000009}}.tar)")


def _needs_path(cfg: Config) -> None:
    if not cfg.data.path:
        raise UserError(f"data.source={cfg.data.source} needs data.path")


def _check_interleaved(cfg: Config) -> None:
    """Interleaved documents come from data.path (JSON Lines) or data.shards; a key neither reads is refused."""
    d = cfg.data
    if bool(d.path) == bool(d.shards):
        raise UserError("data.source=interleaved reads data.path (.jsonl documents) or data.shards (tar shards): "
                        f"set one of them, not {'both' if d.path else 'neither'}")
    why = {"image_column": "a column of data.source=hf", "text_column": "a column of data.source=hf",
           "caption_prompt": "there are no captions: every text segment is an answer"}
    if d.shards:
        why["image_root"] = "the images are members of the shards"
    else:
        why["weights"] = "they weigh data.shards entries"
        why["shuffle_buffer"] = "documents of .jsonl files are visited in a seeded permutation"
    default = DataConfig()
    for key, reason in why.items():
        if getattr(d, key) != getattr(default, key):
            raise UserError(f"data.{key} is not read by data.source=interleaved with data.{'shards' if d.shards else 'path'}"
                            f" ({reason})")


@dataclass(frozen=True)
class SourceKind:
    build: Callable  # (cfg, proc, split) → its sources (proc: the processor that reads them, or None)
    # record i is a pure function of i: read by number, so resume is bit-exact at any world size
    # and whole conversations can be packed into rows (registry.can_pack)
    indexed: bool = False
    tokenizer: Callable = _trained_tokenizer  # (cfg) → the tokenizer a run on it trains, when it names none
    options: tuple[str, ...] = ()  # `data.*` settings only this kind reads (others refuse them: config_checks)
    max_images: Callable = lambda d: d.max_images  # (data config) → the most images an example holds
    label_templates: tuple[str, ...] = ()  # zero-shot prompts in its captions' words ({} = a class name)
    check: Callable = lambda cfg: None  # (config) → UserError for what it needs and lacks
    splits: tuple[str, ...] = ("train",)  # what `graft data show --split` may pick (training reads "train")
    modality: Modality = IMAGES  # what its records' items are (the design builds the tower that reads them)
    world: str | None = "shapes"  # the evaluation task that `eval.splits` names splits of (eval/tasks.py), if any


SOURCES: dict[str, SourceKind] = {
    "shapes": SourceKind(lambda cfg, proc, split: [WorldSource(cfg, proc, split)], indexed=True,
                         tokenizer=world_tokenizer, options=("images_per_doc", "text_only", "grounded_spatial",
                                                         "spatial_questions", "spatial_compare", "cell_targets"),
                         max_images=lambda d: d.images_per_doc, label_templates=LABEL_TEMPLATES, splits=SPLITS),
    "noisy": SourceKind(lambda cfg, proc, split: [NoisySource(make_world(cfg), cfg, split)], indexed=True,
                        tokenizer=world_tokenizer, options=("noise",), check=noise_shares, label_templates=LABEL_TEMPLATES),
    "motion": SourceKind(lambda cfg, proc, split: [MotionSource(cfg, proc, split)], indexed=True,
                         tokenizer=motion_tokenizer, options=("frames", "frame_labels"), check=check_motion,
                         max_images=lambda d: d.frames, splits=MOTION_SPLITS, world="motion"),
    "sensors": SourceKind(lambda cfg, proc, split: [SensorSource(cfg, proc, split)], indexed=True,
                          tokenizer=sensor_tokenizer, check=check_sensors, splits=SENSOR_SPLITS,
                          modality=TIME_SERIES, world="sensors"),
    "webdataset": SourceKind(_webdataset, check=_needs_shards, options=("caption_mix",)),
    "llava": SourceKind(lambda cfg, proc, split: [LlavaSource(cfg.data)], check=_needs_path),
    "hf": SourceKind(lambda cfg, proc, split: [HFSource(cfg.data)], check=_needs_path),
    "interleaved": SourceKind(_interleaved, check=_check_interleaved),
    "ts": SourceKind(lambda cfg, proc, split: [TsSource(cfg.data)], check=_check_ts, modality=TIME_SERIES, world=None,
                     options=("class_prompt",)),
    "arrays": SourceKind(lambda cfg, proc, split: [ArraySource(cfg.data)], check=_check_arrays, modality=TIME_SERIES,
                         world=None, options=("class_prompt",)),
    "series_shards": SourceKind(lambda cfg, proc, split: [SeriesShards(p, i, cfg.data) for i, p in enumerate(cfg.data.shards)],
                                check=lambda cfg: (_needs_shards(cfg), _no_world(cfg)), modality=TIME_SERIES, world=None,
                                options=("class_prompt",)),
    "pamap2": SourceKind(lambda cfg, proc, split: [Pamap2Source(cfg.data, cfg.series.length)], check=_check_pamap2,
                         modality=TIME_SERIES, world=None,
                         options=("class_prompt", "imus", "downsample", "window_stride")),
}


def source_kind(cfg: Config) -> SourceKind:
    """The registered kind of `cfg`'s data.source (config_checks refuses an unknown one)."""
    return SOURCES[cfg.data.source]


def build_sources(cfg: Config, proc=None, split: str = "train") -> tuple[list, list[float]]:
    """`cfg`'s sources (of `split`: SourceKind.splits), read by `proc`, and their mixing weights."""
    sources = source_kind(cfg).build(cfg, proc, split)
    return sources, list(cfg.data.weights) if cfg.data.weights else [1.0] * len(sources)


def training_corpus(cfg: Config, per_source: int = 3000, max_bytes: int = 8 << 20) -> list[str]:
    """Text to train the tokenizer on: the first records' turns of each source (the built-in world's
    tokenizer is trained from its own text instead: `SourceKind.tokenizer`).

    Only texts within the data limits (limits.py) are kept, and at most `max_bytes` in all, so the
    tokenizer's training cost is bounded whatever the data holds."""
    texts, size = [CAPTION_PROMPT, cfg.data.caption_prompt], 0
    for source in build_sources(cfg)[0]:
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
