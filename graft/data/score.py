"""`graft data score SHARDS --with MODEL --out DIR`: each record's image–caption similarity under a
trained dual encoder — a graft run (clip, siglip, clippo, lit, coca, or a BLIP-2 stage-1 run's ITC)
or a local Hugging Face CLIP/SigLIP folder — the CLIP score that DataComp filters by.

    DIR/score.json        what was asked (the shards, the model); the same command again resumes
    DIR/SHARD.parquet     a row per scored record: key (the record's, as in the shard), caption, score;
                          the shard's skip counts in the file's metadata (`skipped`)
    DIR/SHARD.image.npy   with --embeddings: the L2-normalised image and text embeddings, float32,
    DIR/SHARD.text.npy    in the rows' order (for later filters: near duplicates, an evaluation set)

The score is the model's own similarity of a record's image and its (first) caption: the cosine of
the two normalised embeddings; a Q-Former's, the best of its queries (`similarity`). With `--score
itm` it is instead the probability that the caption belongs to the image under the run's image–text
matching head (a dual encoder with `contrastive.itm_layers`, a BLIP-2 stage-1 run: BLIP's CapFilt
filters by it); `--embeddings` still saves the contrastive embeddings. A shard's
files are written whole, its `.parquet` last (graft/atomic.py), so a shard with a `.parquet` is done
and a rerun after a kill skips it. Under torchrun each process scores every WORLD_SIZE-th shard from
its RANK. Records are read as for evaluation (eval/captioned.py, within the data limits): one that
cannot be read is skipped and counted, never a crash.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from graft import atomic
from graft.build import load_run, processor_for
from graft.data.hf_scorer import HFScorer, is_hf_folder
from graft.data.images import open_within
from graft.data.samples import BadSample
from graft.designs import design
from graft.designs.registry import EMBEDS
from graft.errors import UserError
from graft.eval.captioned import load_captioned
from graft.eval.labelled import shard_urls
from graft.eval.zero_shot import embed_images, embed_texts
from graft.rundir import RunDir


SCORES = ("itc", "itm")  # the contrastive similarity; the image–text matching probability


def score_shards(shards: str, model_dir: str, out: Path, embeddings: bool = False, batch_size: int = 256,
                 score: str = "itc") -> dict:
    """Score every shard of `shards` (a folder of *.tar, a path or a brace pattern) not yet done in
    `out`; returns the totals of this process's shards."""
    urls = shard_urls(shards, "no webdataset shards there")
    scorer = scorer_for(model_dir, score)
    asked = {"shards": urls, "model": str(Path(model_dir).resolve()), "embeddings": embeddings}
    _claim(out, asked | ({"score": score} if score != "itc" else {}))  # (folders written before --score: itc)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = [u for u in urls[rank::world] if not (out / f"{Path(u).stem}.parquet").exists()]
    totals = {"shards": 0, "records": 0, "skipped": 0}
    for url in tqdm(mine, desc="graft data score", unit="shard", disable=not sys.stderr.isatty()):
        scored, skipped = _score_shard(url, scorer, out, embeddings, batch_size)
        totals["shards"] += 1
        totals["records"] += scored
        totals["skipped"] += skipped
    return totals


def _claim(out: Path, asked: dict) -> None:
    """`out` is new (then it records `asked`) or a folder this same command started. Race-free
    between torchrun's processes: each writes the same manifest whole."""
    manifest = out / "score.json"
    if manifest.exists():
        if json.loads(manifest.read_text()) != asked:
            raise UserError(f"{out} holds scores of other shards, another model, another --score or another "
                            f"--embeddings choice ({manifest}); use a new --out")
        return
    if out.exists() and any(not _ours(p.name) for p in out.iterdir()):
        raise UserError(f"{out} exists and is not a `graft data score` folder; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(manifest, json.dumps(asked, indent=1))


def _ours(name: str) -> bool:
    """A file `graft data score` writes (or its temporary, graft/atomic.py)."""
    return name.startswith(".") or name == "score.json" or name.endswith((".parquet", ".npy"))


def scorer_for(model_dir: str, score: str = "itc"):
    """A graft dual-encoder run, or a Hugging Face CLIP/SigLIP folder (data/hf_scorer.py); `score`
    itm: a run with an image–text matching head."""
    if score not in SCORES:
        raise UserError(f"--score {score!r} is not one of {', '.join(SCORES)}")
    if is_hf_folder(model_dir):
        if score == "itm":
            raise UserError(f"--score itm: {model_dir} is an HF CLIP/SigLIP folder, which has no image–text matching head")
        return HFScorer(model_dir)
    cfg, _, model, _ = load_run(RunDir(Path(model_dir)))
    if not design(cfg.model).can(EMBEDS):
        raise UserError(f"--with {model_dir}: model={cfg.model} does not embed images and texts into one space; "
                        "scoring needs a dual encoder run (clip, siglip, clippo, lit, coca, qformer_stage1)")
    if score == "itm" and not model.matches:
        raise UserError(f"--score itm: {model_dir} has no image–text matching head (a dual encoder trained with "
                        "contrastive.itm_layers > 0, or a qformer_stage1 run)")
    return GraftScorer(cfg, model.to("cuda" if torch.cuda.is_available() else "cpu"), score)


class GraftScorer:
    """A graft run's embeddings, through its own processor (as evaluation computes them), and with
    `score` itm its match probabilities."""

    def __init__(self, cfg, model, score: str = "itc"):
        self.cfg, self.model, self.proc, self.score = cfg, model, processor_for(cfg), score

    @torch.no_grad()
    def match(self, images, captions, batch_size: int) -> list[float]:
        """P(caption i belongs to image i) for each pair."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = self.proc.pairs(images[i:i + batch_size], captions[i:i + batch_size])
            device = next(self.model.parameters()).device
            out += self.model.match(batch["pixel_values"].to(device), batch["input_ids"].to(device)).exp().tolist()
        return out

    @torch.no_grad()
    def embed(self, images, captions, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (embed_images(self.model, self.proc, images, batch_size),
                embed_texts(self.model, self.proc, captions, batch_size))

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.model.similarity(img, txt)


def shard_pairs(url: str, cfg):
    """One shard's readable records: (its skip log, keys, images, first captions). Records are read
    as for evaluation (eval/captioned.py), images within cfg.data's limits; the others are counted."""
    data = load_captioned(url, cfg)
    keys, images, captions = [], [], []
    for key, raw, caps in data.items():
        try:
            images.append(open_within(raw, cfg.data)[0])
        except BadSample as e:
            data.log.skip(e.reason, key, e.detail)
            continue
        keys.append(key.split(":", 1)[1])  # load_captioned prefixes the shard's name
        captions.append(caps[0])
    return data.log, keys, images, captions


def _score_shard(url: str, scorer, out: Path, embeddings: bool, batch_size: int) -> tuple[int, int]:
    log, keys, images, captions = shard_pairs(url, scorer.cfg)
    scores, img, txt = pair_scores(scorer, images, captions, batch_size)
    if embeddings and images and img is None:  # scored by ITM: the contrastive embeddings only when asked
        img, txt = scorer.embed(images, captions, batch_size)
    if embeddings and images:
        for name, emb in (("image", img), ("text", txt)):
            buf = io.BytesIO()
            np.save(buf, emb.numpy().astype(np.float32), allow_pickle=False)
            atomic.write_bytes(out / f"{Path(url).stem}.{name}.npy", buf.getvalue())
    rows = pa.table({"key": keys, "caption": captions, "score": scores})
    skipped = dict(log.skipped)
    table = io.BytesIO()
    pq.write_table(rows.replace_schema_metadata({"skipped": json.dumps(skipped)}), table)
    atomic.write_bytes(out / f"{Path(url).stem}.parquet", table.getvalue())
    return len(keys), sum(skipped.values())


def pair_scores(scorer, images, captions, batch_size: int) -> tuple[list[float], torch.Tensor | None, torch.Tensor | None]:
    """Each image's similarity to its own caption (or match probability), and the two embeddings
    (None for no records, or when scored by ITM)."""
    if not images:
        return [], None, None
    if scorer.score == "itm":  # the matching head: no embeddings needed (None)
        return scorer.match(images, captions, batch_size), None, None
    img, txt = scorer.embed(images, captions, batch_size)
    return [s for i in range(0, len(images), batch_size)
            for s in scorer.similarity(img[i:i + batch_size], txt[i:i + batch_size]).diagonal().tolist()], img, txt
