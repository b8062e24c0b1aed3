"""`graft data recaption SHARDS --with VLM_RUN --out DIR`: a trained VLM writes a synthetic
caption for every image, kept beside the original (BLIP's CapFilt, Recap-DataComp).

Each output shard is its input shard with one member added per record, `KEY.syn.txt` (the VLM's
greedy answer to its run's caption prompt, `data.caption_prompt`, or with `--temperature` above 0
a nucleus sample (`--top-p`; BLIP found sampling gives more useful captions than beam search),
seeded per shard from `--seed`; none where the answer is empty),
every other member byte for byte; `SHARD.parquet` lists key, caption (the original's first line) and synthetic. Training mixes
the two with `data.caption_mix` (data/webdataset.py: the probability of reading a record's
`.syn.txt`; Recap-DataComp found 0.8 best for retrieval).

CapFilt's filter (`--filter-with SCORER --min-score T`, a dual encoder as `graft data score`
takes): each caption, original and synthetic, is kept when the scorer's image–caption similarity
is at least T (with `--filter-score itm`, the scorer's image–text matching probability: BLIP's own
filter). A record keeps both (`.txt` and `.syn.txt`), the original only (no `.syn.txt`), the
synthetic only (written as its `.txt` too, so every reader takes it), or is dropped; the
`.parquet` says which (`kept`) with both scores. A record whose image cannot be read is skipped
and counted (`recaption.json`, beside the records the filter dropped); shards are written whole, so a rerun after a kill skips those
done; an existing folder of anything else is refused.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from graft import atomic
from graft.build import build_processor, load_run
from graft.data.score import pair_scores, scorer_for, shard_pairs
from graft.data.webdataset import SYNTHETIC
from graft.designs import design
from graft.designs.registry import GENERATES
from graft.errors import UserError
from graft.eval.labelled import shard_urls
from graft.eval.vqa import answer
from graft.rundir import RunDir

MEMBER_LIMIT = 64 << 20


@dataclass
class Captioner:
    """What writes and judges the synthetic captions (see the module docstring)."""
    cfg: object
    model: object
    proc: object
    batch_size: int = 128
    max_new_tokens: int = 32
    sampling: tuple[float, float, int] | None = None  # (temperature, top_p, seed); None: greedy
    scorer: object = None  # CapFilt's filter: data/score.py's scorer_for
    min_score: float = 0.0


def recaption(shards: str, run_dir: str, out: Path, batch_size: int = 128, max_new_tokens: int = 32,
              sampling: tuple[float, float, int] | None = None, filter_with: str | None = None,
              min_score: float = 0.0, filter_score: str = "itc") -> dict:
    urls = shard_urls(shards, "no webdataset shards there")
    cfg, tok, model, _ = load_run(RunDir(Path(run_dir)))
    if not design(cfg.model).can(GENERATES):
        raise UserError(f"--with {run_dir}: model={cfg.model} does not write text; recaptioning needs a VLM run")
    manifest = out / "recaption.json"
    asked = {"shards": urls, "model": str(Path(run_dir).resolve()), "sampling": list(sampling or ()),
             "filter_with": filter_with and str(Path(filter_with).resolve()), "min_score": min_score}
    asked |= {"filter_score": filter_score} if filter_score != "itc" else {}  # (folders written before: itc)
    if manifest.exists() and json.loads(manifest.read_text())["asked"] != asked:
        raise UserError(f"{out} holds captions of other shards, another model or other settings; use a new --out")
    if not manifest.exists() and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a `graft data recaption` folder; use a new --out")
    job = Captioner(cfg, model, build_processor(cfg, tok, model), batch_size, max_new_tokens, sampling,
                    scorer_for(filter_with, filter_score) if filter_with else None, min_score)
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads(manifest.read_text())["shards"] if manifest.exists() else {}
    for i, url in enumerate(tqdm(urls, desc="graft data recaption", unit="shard", disable=not sys.stderr.isatty())):
        if (out / f"{Path(url).stem}.parquet").exists():
            continue
        seeded = sampling and (*sampling[:2], sampling[2] * 100_003 + i)  # a seed per shard
        done[Path(url).name] = _recaption_shard(url, job, seeded, out)
        atomic.write_text(manifest, json.dumps({"asked": asked, "shards": done}, indent=1))
    atomic.write_text(manifest, json.dumps({"asked": asked, "shards": done}, indent=1))
    return {"shards": len(urls), "skipped": sum(sum(d["skipped"].values()) for d in done.values()),
            "rejected": sum(d["rejected"] for d in done.values())}


def _recaption_shard(url: str, job: Captioner, sampling, out: Path) -> dict:
    log, keys, images, captions = shard_pairs(url, job.cfg)
    prompts = [(im, job.cfg.data.caption_prompt) for im in images]
    synthetic = answer(job.model, job.proc, prompts, job.batch_size, job.max_new_tokens, sampling)
    columns = {"key": keys, "caption": captions, "synthetic": synthetic}
    if job.scorer is None:
        kept = ["both" if s.strip() else "original" for s in synthetic]
    else:
        columns["score_caption"] = pair_scores(job.scorer, images, captions, job.batch_size)[0]
        columns["score_synthetic"] = pair_scores(job.scorer, images, synthetic, job.batch_size)[0]
        kept = [_choice(o >= job.min_score, s >= job.min_score and bool(t.strip()))
                for o, s, t in zip(columns["score_caption"], columns["score_synthetic"], synthetic)]
    columns["kept"] = kept
    atomic.write_bytes(out / Path(url).name, _shard(url, dict(zip(keys, zip(synthetic, kept)))))
    table = io.BytesIO()
    pq.write_table(pa.table(columns), table)
    atomic.write_bytes(out / f"{Path(url).stem}.parquet", table.getvalue())  # last: the shard is done
    return {"skipped": dict(log.skipped), "rejected": kept.count("none")}


def _choice(original: bool, synthetic: bool) -> str:
    return {(True, True): "both", (True, False): "original", (False, True): "synthetic"}.get((original, synthetic), "none")


def _shard(url: str, records: dict[str, tuple[str, str]]) -> bytes:
    """The new tar: each kept record's members (key → (synthetic caption, what is kept)), together."""
    members: dict[str, list[tuple[str, bytes]]] = {k: [] for k, (_, kept) in records.items() if kept != "none"}
    with tarfile.open(url, "r|*") as src:
        for info in src:
            key, ext = base_plus_ext(info.name)
            if info.isfile() and key in members and info.size <= MEMBER_LIMIT:
                if not (ext == "txt" and records[key][1] == "synthetic"):  # the rejected original
                    members[key].append((info.name, src.extractfile(info).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in members.items():
            text, kept = records[key]
            extra = {"both": [SYNTHETIC], "original": [], "synthetic": ["txt", SYNTHETIC]}[kept]
            for name, data_bytes in [*files, *((f"{key}.{ext}", text.encode()) for ext in extra)]:
                info = tarfile.TarInfo(name)
                info.size = len(data_bytes)
                tar.addfile(info, io.BytesIO(data_bytes))
    return buf.getvalue()
