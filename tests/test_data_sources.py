"""The data sources on data the tests write themselves (the built-in world exported): each trains through
the CLI, streaming resumes where it stopped, ranks and workers read disjoint records, sources mix by
weight, and multi-turn LLaVA conversations put the loss on assistant turns only."""

import json
import math
from collections import Counter
from itertools import islice

import pytest

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.data.check import processor_for
from graft.data.llava_json import LlavaSource
from graft.data.loader import StreamBatches
from graft.data.samples import encode
from graft.data.skips import SkipLog
from graft.data.sources import build_sources
from graft.data.streaming import StreamDataset, fresh_position
from graft.losses import IGNORE
from graft.recipes import tiny
from graft.trainer.metrics import read
from tests.data_helpers import SMALL, export, llava_json

SOURCE_ARGS = {
    "webdataset": lambda d: ["--set", "data.source=webdataset", "--set", f"data.shards={d}/shapes-{{000000..000003}}.tar"],
    "llava": lambda d: ["--set", "data.source=llava", "--set", f"data.path={d}/llava.json"],
    "hf": lambda d: ["--set", "data.source=hf", "--set", f"data.path={d}"],
}


@pytest.mark.parametrize("fmt,workers", [("webdataset", 2), ("llava", 1), ("hf", 0)])
def test_each_source_exports_checks_and_trains_through_the_cli(tmp_path, fmt, workers):
    export(fmt, tmp_path / "data", 40, "--shard-size", "10")
    args = SOURCE_ARGS[fmt](tmp_path / "data") + ["--set", f"data.workers={workers}"]
    assert main(["data", "check", "tiny", *args]) == 0
    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), *SMALL, *args, "--set", "train.steps=3"]) == 0
    records = [r for r in read(run) if r.get("event") != "eval"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["data_skipped"] == 0 for r in records)
    assert 0 <= records[-1]["data_wait_frac"] < 1
    meta = json.loads((run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["data"]["ranks"][0]["used"] == 3 * 8


def losses(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read(run) if r.get("event") != "eval"]


def test_streaming_resume_continues_with_the_same_batches(tmp_path):
    export("webdataset", tmp_path / "a", 48, "--shard-size", "8")
    export("webdataset", tmp_path / "b", 24, "--shard-size", "8", "--set", "data.seed=7")
    shards = f'data.shards=["{tmp_path}/a/shapes-{{000000..000005}}.tar", "{tmp_path}/b/shapes-{{000000..000002}}.tar"]'
    args = [*SMALL, "--set", "data.source=webdataset", "--set", shards, "--set", "data.weights=[3, 1]",
            "--set", "data.workers=2", "--set", "data.shuffle_buffer=20", "--set", "train.ckpt_every=3"]
    # 9 steps of 8 records from 2 workers x ~36 records: both sources wrap into later epochs
    assert main(["train", "tiny", "--out", str(tmp_path / "straight"), *args, "--set", "train.steps=9"]) == 0
    resumed = tmp_path / "resumed"
    assert main(["train", "tiny", "--out", str(resumed), *args, "--set", "train.steps=3"]) == 0
    meta = json.loads((resumed / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["data"]["ranks"][0]["next_worker"] == 1  # 3 batches from 2 workers: worker 1 is next
    assert main(["train", "tiny", "--out", str(resumed), *args, "--set", "train.steps=9"]) == 0
    assert losses(resumed) == losses(tmp_path / "straight")  # exact: same batches after the resume
    assert len(losses(resumed)) == 9


def _keys_seen_by_rank(cfg, proc, rank: int, batches: int) -> list[str]:
    sources, weights = build_sources(cfg)
    stream = StreamBatches(cfg, proc, sources, weights, rank, 2, None)
    keys = []
    for _ in range(batches):
        stream.batch(0, 0)
        keys += stream.last_keys
    stream.close()
    return keys


@pytest.mark.parametrize("layout", ["8 shards", "1 shard", "llava"])
def test_ranks_and_workers_read_disjoint_records(tmp_path, layout):
    fmt = "llava" if layout == "llava" else "webdataset"
    export(fmt, tmp_path / "d", 64, "--shard-size", "8" if layout == "8 shards" else "64")
    last = "000007" if layout == "8 shards" else "000000"
    source = ["data.source=llava", f"data.path={tmp_path}/d/llava.json"] if fmt == "llava" else \
        ["data.source=webdataset", f"data.shards={tmp_path}/d/shapes-{{000000..{last}}}.tar"]
    cfg = apply_overrides(tiny(), [*source, "data.workers=2", "data.shuffle_buffer=10", "train.batch_size=4"])
    proc = processor_for(cfg)
    # one epoch is 64 records = 16 per (rank, worker) slot; 6 batches of 4 per rank stay inside it
    seen = [_keys_seen_by_rank(cfg, proc, rank, 6) for rank in (0, 1)]
    assert all(len(keys) == 24 and len(set(keys)) == 24 for keys in seen)
    assert not set(seen[0]) & set(seen[1])
    # the four slots of an epoch partition it exactly
    sources, weights = build_sources(cfg)
    ds = StreamDataset(sources, weights, proc, cfg.data, 4, 0, 2, 2, {}, 0)
    slots = [[k for k, _ in filter(None, ds.examples(s, 4, fresh_position(1), SkipLog(), epochs=1))] for s in range(4)]
    assert sum(len(s) for s in slots) == 64 and len(set().union(*map(set, slots))) == 64


def test_sources_mix_by_weight(tmp_path):
    export("webdataset", tmp_path / "a", 16, "--shard-size", "8")
    export("webdataset", tmp_path / "b", 16, "--shard-size", "8", "--set", "data.seed=3")
    cfg = apply_overrides(tiny(), ["data.source=webdataset", "data.weights=[3, 1]",
                                   f'data.shards=["{tmp_path}/a/shapes-{{000000..000001}}.tar", '
                                   f'"{tmp_path}/b/shapes-{{000000..000001}}.tar"]'])
    sources, weights = build_sources(cfg)
    ds = StreamDataset(sources, weights, None, cfg.data, 4, 0, 1, 1, {}, 0)
    position = fresh_position(2)
    draws = [i for i, _ in islice(ds.records(0, 1, position, SkipLog()), 800)]
    share = Counter(draws)[0] / len(draws)
    assert 0.70 < share < 0.80, share  # 3:1 → 0.75 (binomial sd over 800 draws ≈ 0.015)
    assert position["sources"][1][0] >= 5  # the small source looped over many epochs meanwhile


def test_llava_multi_turn_loss_is_on_assistant_turns_only(tmp_path):
    export("llava", tmp_path / "d", 1)
    conv = [{"from": "system", "value": "be brief"},
            {"from": "human", "value": "what color is the circle?\n<image>"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many objects are there?"}, {"from": "gpt", "value": "2"},
            {"from": "human", "value": "describe the image."}, {"from": "gpt", "value": "a large red circle"}]
    llava_json(tmp_path / "d" / "multi.json", [{"id": "x", "image": "images/00000000.png", "conversations": conv}])
    cfg = apply_overrides(tiny(), ["data.source=llava", f"data.path={tmp_path}/d/multi.json"])
    proc = processor_for(cfg)
    (source,) = build_sources(cfg)[0]
    assert isinstance(source, LlavaSource)
    example = source.example(0)
    assert example.turns[0] == ("what color is the circle?", "red")  # the marker is where the image goes
    ids, labels, truncated = encode(proc, example.turns)
    tok = proc.tok
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE]
    answers = [tok.encode(a) + [tok.eos] for a in ("red", "2", "a large red circle")]
    assert supervised == [t for a in answers for t in a] and not truncated
    assert ids.count(tok.image) == proc.num_image_tokens
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
