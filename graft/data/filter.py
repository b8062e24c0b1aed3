"""`graft data filter SHARDS --scores DIR --keep RULE ... --out DIR`: keep the records that pass
every rule, as new shards in the same layout (DataComp's filtering track, in one command).

Rules (`--keep`, repeatable; a record is kept when it passes all):

    score>=T          its CLIP score (`graft data score`) at least T
    top=F             among the best fraction F by CLIP score (DataComp's 30 % is top=0.3)
    random=F          a random fraction F (seeded: the same records every time; DataComp's baseline)
    words>=N          a caption of at least N words
    no_boilerplate    a caption that is not stock alt-text ("image", "click to enlarge", a file name)
    dedup             the first of records with the same image bytes (exact duplicates)
    near_dup<C        not within cosine C of an earlier record's image embedding, among its 8
                      nearest (near duplicates: the first stays; needs `score --embeddings`)
    far_from=DIR<C    no image embedding within cosine C of an evaluation set's (DIR: `graft data
                      score EVAL_SHARDS --embeddings` of that set with the same model)

Near neighbours come from faiss (inner product of L2-normalised embeddings), not an all-pairs loop.
Each shard is read twice: once for what the rules read (keys, truth, image bytes), once to copy.
"Earlier" is the shards' order. The output folder gets a `.tar` per input shard that keeps
anything (the kept records' members, byte for byte), and `manifest.json`: the rules, what each
dropped (a record counted under the first rule it fails), and the kept count; `keys.npy` lists the
kept keys (DataComp's list of uids). Where the shards carry the noisy world's truth (`.json`
`noise`), the filter's precision and recall against it are in the manifest and printed. Everything
is written into a temporary folder renamed to `--out` at the end: it appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext

from graft.config import DataConfig
from graft.data.limits import parse_json
from graft.data.noisy_world import BOILERPLATE
from graft.data.samples import BadSample
from graft.data.skips import SkipLog
from graft.data.tar import read_shard
from graft.errors import UserError
from graft.eval.labelled import SHARD_IMAGE_EXTS, shard_urls

RULES = ("score>=T", "top=F", "random=F", "words>=N", "no_boilerplate", "dedup", "near_dup<C", "far_from=DIR<C")
FILE_NAME = re.compile(r"^\S+\.(jpe?g|png|gif|webp|bmp)$", re.I)
MEMBER_LIMIT = 64 << 20  # bytes of one member copied to the output


@dataclass
class Pool:
    """What the rules read, one row per scored record in the shards' order."""
    urls: list[str]
    keys: list[str]
    shard: list[int]  # index into urls
    captions: list[str]
    scores: np.ndarray
    images: dict[int, np.ndarray] = field(default_factory=dict)  # per shard, when saved
    truth: dict[str, str] = field(default_factory=dict)  # key -> noise kind, where the shards say
    digests: list[str] = field(default_factory=list)  # of the image bytes, when `dedup` reads them


def filter_shards(shards: str, scores: Path, rules: list[str], out: Path) -> dict:
    if out.exists():
        raise UserError(f"{out} exists: graft data filter writes a new folder (nothing is overwritten)")
    if not rules:
        raise UserError(f"--keep names no rule ({', '.join(RULES)})")
    pool = _read_pool(shard_urls(shards, "no webdataset shards there"), scores, "dedup" in rules)
    keep, dropped = np.ones(len(pool.keys), bool), {}
    for rule in rules:
        passed = _rule(rule, pool)
        dropped[rule] = int((keep & ~passed).sum())
        keep &= passed
    if not keep.any():
        raise UserError(f"--keep {' '.join(rules)} keeps no record of {len(keep)}; nothing written")
    manifest = {"rules": rules, "records": len(keep), "kept": int(keep.sum()), "dropped": dropped}
    if pool.truth:
        manifest["truth"] = _against_truth(pool, keep)
    _write(pool, keep, manifest, out)
    return manifest


def _read_pool(urls: list[str], scores: Path, hash_images: bool) -> Pool:
    """The scores of every shard, checked against the shards' own keys; each shard read once (its
    .json for the noisy world's truth, and with `hash_images` its image bytes for `dedup`)."""
    pool = Pool(urls, [], [], [], np.zeros(0))
    values = []
    for i, url in enumerate(urls):
        table_path = scores / f"{Path(url).stem}.parquet"
        if not table_path.exists():
            raise UserError(f"--scores {scores}: no {table_path.name} for shard {url} (run `graft data score` on "
                            "these shards first)")
        table = pq.read_table(table_path).to_pydict()
        keys, truth, digests = _scan(url, hash_images)
        if not set(table["key"]) <= keys:
            stray = next(k for k in table["key"] if k not in keys)
            raise UserError(f"--scores {table_path}: key {stray!r} is not in {url}: the scores belong to other shards")
        pool.keys += table["key"]
        pool.shard += [i] * len(table["key"])
        pool.captions += table["caption"]
        pool.digests += [digests.get(k, f"{i}/{k}") for k in table["key"]]  # no image: like no other
        values += table["score"]
        pool.truth |= {k: truth[k] for k in table["key"] if k in truth}
        emb = scores / f"{Path(url).stem}.image.npy"
        if emb.exists():
            pool.images[i] = np.load(emb, allow_pickle=False)
    pool.scores = np.asarray(values, np.float32)
    return pool


def _scan(url: str, hash_images: bool) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """A shard's record keys, the noisy world's truth where its .json holds one, and (`hash_images`)
    the SHA-256 of each record's image bytes."""
    keys, truth, digests, limits = set(), {}, {}, DataConfig()
    members = {"json": limits.max_json_bytes} | ({e: MEMBER_LIMIT for e in SHARD_IMAGE_EXTS} if hash_images else {})
    for rec in read_shard(url, members, SkipLog()):
        keys.add(rec["__key__"])
        if hash_images:
            image = next((rec[e] for e in SHARD_IMAGE_EXTS if e in rec), b"")
            digests[rec["__key__"]] = hashlib.sha256(image).hexdigest()
        try:  # within graft's JSON limits (size, depth): a hostile .json is no truth, never a crash
            meta = parse_json(rec["json"], limits, ".json") if "json" in rec else None
        except BadSample:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("noise"), str):
            truth[rec["__key__"]] = meta["noise"]
    return keys, truth, digests


def _rule(rule: str, pool: Pool) -> np.ndarray:
    """The records of the whole pool that `rule` passes (a fraction is of the whole pool)."""
    name, value = _split(rule)
    if name == "score>=":
        return pool.scores >= value
    if name == "top=":
        if not 0 < value <= 1:
            raise UserError(f"--keep {rule}: the fraction must be in (0, 1]")
        n = max(1, round(value * len(pool.scores)))
        return pool.scores >= np.sort(pool.scores)[::-1][n - 1]
    if name == "random=":
        if not 0 < value <= 1:
            raise UserError(f"--keep {rule}: the fraction must be in (0, 1]")
        out = np.zeros(len(pool.scores), bool)
        out[np.random.default_rng(0).permutation(len(out))[:max(1, round(value * len(out)))]] = True
        return out
    if name == "words>=":
        return np.array([len(c.split()) >= value for c in pool.captions])
    if name == "no_boilerplate":
        return np.array([c.strip().lower() not in BOILERPLATE and not FILE_NAME.match(c.strip()) for c in pool.captions])
    if name == "dedup":
        return _first_of_each(pool.digests)
    if name == "near_dup<":
        return ~_near(_embeddings(pool, rule), None, value)
    if name == "far_from=":
        where, threshold = value
        return ~_near(_embeddings(pool, rule), _eval_embeddings(where, rule), threshold)
    raise UserError(f"--keep {rule}: not a rule ({', '.join(RULES)})")


def _split(rule: str):
    for name in ("score>=", "top=", "random=", "words>=", "near_dup<"):
        if rule.startswith(name):
            try:
                return name, float(rule[len(name):])
            except ValueError:
                raise UserError(f"--keep {rule}: {rule[len(name):]!r} is not a number") from None
    if rule.startswith("far_from="):
        where, sep, c = rule[len("far_from="):].rpartition("<")
        try:
            return "far_from=", (Path(where), float(c))
        except ValueError:
            raise UserError(f"--keep {rule}: write far_from=DIR<COSINE (e.g. far_from=eval_scores<0.95)") from None
    return rule, None


def _first_of_each(values: list[str]) -> np.ndarray:
    seen, out = set(), np.zeros(len(values), bool)
    for i, v in enumerate(values):
        out[i] = v not in seen
        seen.add(v)
    return out


def _embeddings(pool: Pool, rule: str) -> np.ndarray:
    missing = [pool.urls[i] for i in sorted(set(pool.shard)) if i not in pool.images]
    if missing:
        raise UserError(f"--keep {rule} compares image embeddings: score {missing[0]} with `graft data score "
                        "--embeddings`")
    return np.concatenate([pool.images[i] for i in sorted(pool.images)]).astype(np.float32)


def _eval_embeddings(where: Path, rule: str) -> np.ndarray:
    files = sorted(where.glob("*.image.npy"))
    if not files:
        raise UserError(f"--keep {rule}: {where} holds no image embeddings (`graft data score EVAL --with RUN "
                        f"--out {where} --embeddings`)")
    return np.concatenate([np.load(f, allow_pickle=False) for f in files]).astype(np.float32)


def _near(emb: np.ndarray, others: np.ndarray | None, cosine: float) -> np.ndarray:
    """Which rows of `emb` have a neighbour with cosine ≥ `cosine`: among `others`, or (None) among
    the rows before them. faiss: exact inner-product search, 8 neighbours per query."""
    try:
        import faiss  # lazy: only the embedding rules need it (pip install faiss-cpu)
    except ImportError:
        raise UserError("the near_dup and far_from rules use faiss: pip install faiss-cpu") from None
    base = emb if others is None else others
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base))
    k = min(8, len(base))
    sims, ids = index.search(np.ascontiguousarray(emb), k)
    if others is not None:
        return (sims >= cosine).any(1)
    rows = np.arange(len(emb))[:, None]
    return ((sims >= cosine) & (ids < rows) & (ids >= 0)).any(1)


def _against_truth(pool: Pool, keep: np.ndarray) -> dict:
    """Precision and recall of what was dropped, against the records' noise (clean or not)."""
    labelled = [i for i, k in enumerate(pool.keys) if k in pool.truth]
    noisy = np.array([pool.truth[pool.keys[i]] != "clean" for i in labelled])
    dropped = ~keep[labelled]
    tp = int((noisy & dropped).sum())
    return {"records": len(labelled), "noisy": int(noisy.sum()),
            "precision": tp / max(int(dropped.sum()), 1), "recall": tp / max(int(noisy.sum()), 1)}


def _write(pool: Pool, keep: np.ndarray, manifest: dict, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, url in enumerate(pool.urls):
        kept = {k for s, k, ok in zip(pool.shard, pool.keys, keep) if ok and s == i}
        if kept:
            _copy_records(url, kept, tmp / Path(url).name)
    np.save(tmp / "keys.npy", np.array([k for k, ok in zip(pool.keys, keep) if ok]), allow_pickle=False)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp.rename(out)


def _copy_records(url: str, keys: set[str], dst: Path) -> None:
    """The members of `url`'s records named in `keys`, byte for byte, into a new tar `dst` (the
    shards were read whole by `graft data score`; a member over MEMBER_LIMIT is left out)."""
    with tarfile.open(url, "r|*") as src, tarfile.open(dst, "w") as tar:
        for info in src:
            key, _ = base_plus_ext(info.name)
            if info.isfile() and key in keys and info.size <= MEMBER_LIMIT:
                tar.addfile(_plain(info), src.extractfile(info))


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A regular member's name and size only (no owner, mode or link from the input)."""
    out = tarfile.TarInfo(info.name)
    out.size = info.size
    return out
