"""`graft data export-noisy`: the noisy-web pool (data/noisy_world.py) as img2dataset shards, with
each record's ground truth beside it.

    OUT/00000.tar      KEY.png, KEY.txt (the caption), KEY.json ({key, caption, noise, origin})
    OUT/00000.parquet  a row per record: key, caption, noise, origin, status ("success")

Keys are the pool's indices, nine digits (img2dataset's width). Images are PNG, as in the clean
export (the world's colours are its answers). Training reads the `.txt` caption (or the `.json`'s
`caption`); `noise` and `origin` are there for measuring a filter. Each shard and its `.parquet`
are written whole (graft/atomic.py), so a folder never holds a half-written one; an existing OUT is
refused, so nothing is overwritten.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from graft import atomic
from graft.config import Config
from graft.data.noisy_world import NoisyWorld, noise_shares
from graft.data.world_source import make_world
from graft.errors import UserError


def export_noisy(cfg: Config, out: Path, n: int, shard_size: int = 1000) -> list[str]:
    """Records 0..n-1 of the pool as shards in `out`; returns the settings that train on them."""
    if out.exists():
        raise UserError(f"{out} exists: graft data export-noisy writes a new folder (nothing is overwritten)")
    pool = NoisyWorld(make_world(cfg), noise_shares(cfg))
    out.mkdir(parents=True)
    shards = (n + shard_size - 1) // shard_size
    for shard in range(shards):
        tar, rows = io.BytesIO(), []
        with wds.TarWriter(tar) as sink:
            for index in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                r, key = pool.record(index), f"{index:09d}"
                png = io.BytesIO()
                r.image.save(png, format="PNG")
                row = {"key": key, "caption": r.caption, "noise": r.noise.kind, "origin": r.noise.origin}
                sink.write({"__key__": key, "png": png.getvalue(), "txt": r.caption.encode(),
                            "json": json.dumps(row).encode()})
                rows.append({**row, "status": "success"})
        table = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), table)
        atomic.write_bytes(out / f"{shard:05d}.parquet", table.getvalue())
        atomic.write_bytes(out / f"{shard:05d}.tar", tar.getvalue())  # last: a shard is complete when its tar is there
    return ["data.source=webdataset", f"data.shards={out}/{{00000..{shards - 1:05d}}}.tar"]
