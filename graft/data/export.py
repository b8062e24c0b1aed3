"""`graft data export-shapes`: the built-in world written in the formats real data comes in.

Sample i's conversation is exactly the one the built-in stream trains on for index i (same
questions, same order, same caption request), so a model trained from the export and one trained
on the world see the same data. Images are PNG (lossless: the world's colours are its answers).

    webdataset  OUT/shapes-000000.tar ...: KEY.png, KEY.txt (caption), KEY.json (caption + conversations)
    llava       OUT/llava.json + OUT/images/KEY.png (paths relative to the JSON's folder)
    hf          OUT/ (datasets save_to_disk): columns image (Image), text (conversation), caption
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import webdataset as wds

from graft.config import Config
from graft.data.samples import IMAGE_MARKER
from graft.data.world_source import make_world, training_turns



def llava_conversation(turns: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append({"from": "human", "value": f"{IMAGE_MARKER}\n{question}" if i == 0 else question})
        messages.append({"from": "gpt", "value": answer})
    return messages


def records(cfg: Config, n: int, split: str = "train"):
    """(key, png bytes, caption, LLaVA conversation) for world samples 0..n-1 of `split`."""
    world, d = make_world(cfg), cfg.data
    for i in range(n):
        sample = world.sample(split, i)
        turns = training_turns(sample, random.Random(f"turns/{d.seed}/{i}"), d.questions_per_image, d.caption_prob)
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        yield f"{i:08d}", buf.getvalue(), sample.caption, llava_conversation(turns)


def export_shapes(cfg: Config, fmt: str, out: Path, n: int, shard_size: int = 1000) -> list[str]:
    """Write n samples as `fmt` (one of FORMATS); returns the `key=value` settings that train on what was written."""
    out.mkdir(parents=True, exist_ok=True)
    return WRITERS[fmt](cfg, out, n, shard_size)


def _llava(cfg: Config, out: Path, n: int, shard_size: int) -> list[str]:
    images = out / "images"
    images.mkdir(exist_ok=True)
    entries = []
    for key, png, _, conv in records(cfg, n):
        (images / f"{key}.png").write_bytes(png)
        entries.append({"id": key, "image": f"images/{key}.png", "conversations": conv})
    (out / "llava.json").write_text(json.dumps(entries))
    return ["data.source=llava", f"data.path={out / 'llava.json'}"]


def _hf(cfg: Config, out: Path, n: int, shard_size: int) -> list[str]:
    # lazy: datasets takes ~0.6 s to import
    import datasets

    datasets.disable_progress_bars()
    rows = list(records(cfg, n))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "text": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": r[1], "path": f"{r[0]}.png"} for r in rows],
                                     "caption": [r[2] for r in rows], "text": [r[3] for r in rows]},
                                    features=features)
    ds.save_to_disk(str(out))
    return ["data.source=hf", f"data.path={out}"]


def _webdataset(cfg: Config, out: Path, n: int, shard_size: int) -> list[str]:
    with wds.ShardWriter(str(out / "shapes-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for key, png, caption, conv in records(cfg, n):
            meta = {"caption": caption, "conversations": conv}
            sink.write({"__key__": key, "png": png, "txt": caption.encode(), "json": json.dumps(meta).encode()})
    last = (n - 1) // shard_size
    return ["data.source=webdataset", f"data.shards={out}/shapes-{{000000..{last:06d}}}.tar"]


WRITERS = {"webdataset": _webdataset, "llava": _llava, "hf": _hf}  # one per `data.source` it can feed
FORMATS = tuple(WRITERS)
