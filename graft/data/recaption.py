"""`graft data recaption SHARDS --with VLM_RUN --out DIR`: a trained VLM writes a synthetic
caption for every image, kept beside the original (BLIP's CapFilt, Recap-DataComp).

Each output shard is its input shard with one member added per record, `KEY.syn.txt` (the VLM's
greedy answer to its run's caption prompt, `data.caption_prompt`, or with `--temperature` above 0
a nucleus sample (`--top-p`; BLIP found sampling gives more useful captions than beam search),
seeded per shard from `--seed`; none where the answer is empty),
every other member byte for byte; `SHARD.parquet` lists key, caption (the original's first line) and synthetic. Training mixes
the two with `data.caption_mix` (data/webdataset.py: the probability of reading a record's
`.syn.txt`; Recap-DataComp found 0.8 best for retrieval). A record whose image cannot be read is
skipped and counted (`recaption.json`); shards are written whole, so a rerun after a kill skips
those done; an existing folder of anything else is refused.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from graft import atomic
from graft.build import build_processor, load_run
from graft.data.images import open_within
from graft.data.samples import BadSample
from graft.data.webdataset import SYNTHETIC
from graft.designs import design
from graft.designs.registry import GENERATES
from graft.errors import UserError
from graft.eval.captioned import load_captioned
from graft.eval.labelled import shard_urls
from graft.eval.vqa import answer
from graft.rundir import RunDir

MEMBER_LIMIT = 64 << 20


def recaption(shards: str, run_dir: str, out: Path, batch_size: int = 128, max_new_tokens: int = 32,
              sampling: tuple[float, float, int] | None = None) -> dict:
    urls = shard_urls(shards, "no webdataset shards there")
    cfg, tok, model, _ = load_run(RunDir(Path(run_dir)))
    if not design(cfg.model).can(GENERATES):
        raise UserError(f"--with {run_dir}: model={cfg.model} does not write text; recaptioning needs a VLM run")
    manifest = out / "recaption.json"
    asked = {"shards": urls, "model": str(Path(run_dir).resolve()), "sampling": list(sampling or ())}
    if manifest.exists() and json.loads(manifest.read_text())["asked"] != asked:
        raise UserError(f"{out} holds captions of other shards or another model; use a new --out")
    if not manifest.exists() and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a `graft data recaption` folder; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads(manifest.read_text())["skipped"] if manifest.exists() else {}
    proc = build_processor(cfg, tok, model)
    for url in tqdm(urls, desc="graft data recaption", unit="shard", disable=not sys.stderr.isatty()):
        if (out / f"{Path(url).stem}.parquet").exists():
            continue
        shard_sampling = sampling and (*sampling[:2], sampling[2] * 100_003 + urls.index(url))  # a seed per shard
        done[Path(url).name] = _recaption_shard(url, cfg, model, proc, out, batch_size, max_new_tokens, shard_sampling)
        atomic.write_text(manifest, json.dumps({"asked": asked, "skipped": done}, indent=1))
    atomic.write_text(manifest, json.dumps({"asked": asked, "skipped": done}, indent=1))
    return {"shards": len(urls), "skipped": sum(sum(s.values()) for s in done.values())}


def _recaption_shard(url, cfg, model, proc, out: Path, batch_size: int, max_new_tokens: int, sampling) -> dict:
    data = load_captioned(url, cfg)
    keys, images, captions = [], [], []
    for key, raw, caps in data.items():
        try:
            images.append(open_within(raw, cfg.data)[0])
        except BadSample as e:
            data.log.skip(e.reason, key, e.detail)
            continue
        keys.append(key.split(":", 1)[1])
        captions.append(caps[0])
    synthetic = answer(model, proc, [(im, cfg.data.caption_prompt) for im in images], batch_size, max_new_tokens,
                       sampling)
    by_key = dict(zip(keys, synthetic))
    members: dict[str, list[tuple[str, bytes]]] = {key: [] for key in keys}  # a record's members stay together
    with tarfile.open(url, "r|*") as src:
        for info in src:
            key, _ = base_plus_ext(info.name)
            if info.isfile() and key in members and info.size <= MEMBER_LIMIT:
                members[key].append((info.name, src.extractfile(info).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in members.items():
            written = [(f"{key}.{SYNTHETIC}", by_key[key].encode())] if by_key[key].strip() else []  # none: the original
            for name, data_bytes in [*files, *written]:
                info = tarfile.TarInfo(name)
                info.size = len(data_bytes)
                tar.addfile(info, io.BytesIO(data_bytes))
    table = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "caption": captions, "synthetic": synthetic}), table)
    atomic.write_bytes(out / Path(url).name, buf.getvalue())
    atomic.write_bytes(out / f"{Path(url).stem}.parquet", table.getvalue())  # last: the shard is done
    return dict(data.log.skipped)
