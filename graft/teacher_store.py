"""Teacher outputs computed once and read back by record: `graft distill precompute RECIPE --out
DIR` walks the records a run of RECIPE reads in its `train.steps` steps through its frozen teachers
and saves what they give; a run with `distill.precomputed=DIR` reads them instead of running the
teachers (a student of a large teacher, or the many arms and seeds of a study over the same
records, pays for the teachers' forwards once).

A record is keyed by what a teacher reads of it: the BLAKE2b digest of its row of the batch (the
pixels as float32 bytes, the token ids, rendered text), so the key is the record's content whatever
its source, its batch or the number of processes, and a record of other data or other settings is
never mistaken for it. A stored output is a list (per teacher) of tuples of tensors; each tensor
either has a row per record (embeddings, patch features) or is one value of the teacher (its logit
scale). Files: DIR/outputs.safetensors (`keys` (N, 16) uint8 and `t<k>.<j>` per teacher k, output j;
no pickle) and DIR/manifest.json (the teachers and their fingerprints, the data and read settings,
what each output is). A run checks the manifest against its own settings before anything is
written; a record missing from the store fails the step in one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graft.config import to_dict
from graft.errors import UserError
from graft.objectives import Teacher
from graft.rundir import RunDir

KEY_FIELDS = ("pixel_values", "input_ids", "text_pixels")  # what a teacher reads of a row
FILES = ("outputs.safetensors", "manifest.json")
UNREAD = ("strict", "min_good_fraction", "check_batches")  # data settings that change no record's content


def row_keys(batch: dict) -> list[bytes]:
    """Each row's key: the digest of its pixels, token ids and rendered text (whichever the batch has)."""
    parts = [batch[k].detach().to("cpu", torch.float32 if batch[k].is_floating_point() else torch.int64).contiguous()
             for k in KEY_FIELDS if batch.get(k) is not None]
    keys = []
    for i in range(parts[0].shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for t in parts:
            h.update(t[i].numpy().tobytes())
        keys.append(h.digest())
    return keys


def fingerprint(path: str) -> str:
    """What identifies a teacher's weights: the names and sizes of its latest checkpoint's files (a
    graft run) or of its folder's files and its config.json (an HF folder). A teacher trained on, or
    another folder at the same path, gets another fingerprint."""
    root = Path(path)
    base = RunDir(path).latest_checkpoint() if (root / "config.yaml").is_file() else root
    if base is None or not base.is_dir():
        raise UserError(f"distill.teachers: {path} has no complete checkpoint")
    h = hashlib.sha256()
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(base)}:{f.stat().st_size}\n".encode())
    if (root / "config.json").is_file():
        h.update((root / "config.json").read_bytes())
    return h.hexdigest()[:24]


def reads(cfg) -> dict:
    """The settings that decide what a teacher is handed: the data section and how images and text
    become tensors."""
    d = to_dict(cfg)
    data = {k: v for k, v in d["data"].items() if k not in UNREAD}
    return {"data": data, "vision": {k: d["vision"][k] for k in ("image_size", "image_mean", "image_std")},
            "text": {"max_len": d["text"]["max_len"]}, "shared_tower": d["contrastive"]["shared_tower"]}


def _flat(outputs) -> list:
    """The stored tensors of one batch's teacher outputs (a list per teacher of tuples), or a refusal."""
    if not isinstance(outputs, list) or not all(isinstance(t, tuple) for t in outputs):
        raise UserError("graft distill precompute: this design's teacher outputs are not per record "
                        "(a list per teacher of tuples of tensors); precomputed outputs are for dual encoders")
    return outputs


class Writer:
    """Collects each new record's teacher outputs, then writes the store."""

    def __init__(self):
        self.index: dict[bytes, int] = {}
        self.rows: list[list[list]] = []  # per teacher, per output: the per-row blocks
        self.kinds: list[list[str]] = []  # per teacher, per output: row | one | none

    def add(self, keys: list[bytes], outputs) -> int:
        new = [i for i, k in enumerate(keys) if k not in self.index]
        if not new:
            return 0
        outputs = _flat(outputs)
        if not self.kinds:
            self.kinds = [[self._kind(x, len(keys)) for x in t] for t in outputs]
            self.rows = [[[] for _ in t] for t in outputs]
        for k, teacher in enumerate(outputs):
            for j, x in enumerate(teacher):
                if self.kinds[k][j] == "row":
                    self.rows[k][j].append(x[new].float().cpu())
                elif self.kinds[k][j] == "one" and not self.rows[k][j]:
                    self.rows[k][j].append(x.float().cpu())
        for i in new:
            self.index[keys[i]] = len(self.index)
        return len(new)

    @staticmethod
    def _kind(x, rows: int) -> str:
        if x is None:
            return "none"
        if x.dim() == 0:  # one value of the teacher's (its logit scale)
            return "one"
        if x.shape[0] == rows:
            return "row"
        raise UserError(f"graft distill precompute: a teacher output of shape {tuple(x.shape)} is neither per "
                        f"record ({rows} rows) nor one 0-d value")

    def tensors(self) -> dict[str, torch.Tensor]:
        keys = torch.tensor([list(k) for k in self.index], dtype=torch.uint8)
        out = {"keys": keys}
        for k, teacher in enumerate(self.rows):
            for j, blocks in enumerate(teacher):
                if self.kinds[k][j] == "row":
                    out[f"t{k}.{j}"] = torch.cat(blocks)
                elif self.kinds[k][j] == "one":
                    out[f"t{k}.{j}"] = blocks[0]
        return out


def precompute(cfg, out: Path, teacher, stream, *, log=print) -> dict:
    """Walk `stream` (the run's micro-batches) for `cfg.train.steps` steps through `teacher` and save
    each new record's outputs to `out` (a new folder, written whole or not at all). Returns the manifest."""
    if out.exists():
        raise UserError(f"{out} exists: graft distill precompute writes a new folder")
    writer, started, batches = Writer(), time.perf_counter(), 0
    for step in range(cfg.train.steps):
        for micro in range(cfg.train.grad_accum):
            batch = stream.batch(step, micro)
            keys = row_keys(batch)
            if any(k not in writer.index for k in keys):
                writer.add(keys, teacher(batch))
                batches += 1
        if (step + 1) % max(1, cfg.train.steps // 10) == 0:
            log(f"step {step + 1}/{cfg.train.steps}: {len(writer.index)} records", flush=True)
    manifest = {"teachers": [{"from": p, "fingerprint": fingerprint(p)} for p in cfg.distill.paths],
                "losses": list(cfg.distill.losses), "outputs": writer.kinds, "records": len(writer.index),
                "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "reads": reads(cfg),
                "seconds": round(time.perf_counter() - started, 1), "teacher_batches": batches}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        save_file(writer.tensors(), str(tmp / FILES[0]))
        os.chmod(tmp / FILES[0], 0o644)  # safetensors writes it 0600
        (tmp / FILES[1]).write_text(json.dumps(manifest, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def manifest(path: str) -> dict:
    """A store's manifest, or a one-line refusal naming the folder."""
    root = Path(path)
    if not all((root / f).is_file() for f in FILES):
        raise UserError(f"distill.precomputed: {path} is not a folder written by graft distill precompute "
                        f"(no {' or '.join(FILES)})")
    try:
        m = json.loads((root / FILES[1]).read_text())
    except (ValueError, UnicodeDecodeError):
        m = None
    if not isinstance(m, dict) or not {"teachers", "reads", "outputs"} <= set(m):  # what every store's holds
        raise UserError(f"distill.precomputed: {root / FILES[1]} is not a readable manifest")
    return m


def check(cfg, m: dict, path: str) -> None:
    """The store was made by this run's teachers over this run's data and read settings."""
    theirs = [t["from"] for t in m["teachers"]]
    if not set(cfg.distill.paths) <= set(theirs):
        raise UserError(f"distill.precomputed: {path} holds the outputs of teachers {theirs}, not of all of this "
                        f"run's {cfg.distill.paths}")
    for t in m["teachers"]:
        if t["from"] in cfg.distill.paths and fingerprint(t["from"]) != t["fingerprint"]:
            raise UserError(f"distill.precomputed: {path} was computed from another state of {t['from']} "
                            "(its checkpoint changed since); precompute again")
    mine = reads(cfg)
    for section, value in m["reads"].items():
        if mine.get(section) != value:
            key = next((k for k in value if mine[section].get(k) != value[k]), None) if isinstance(value, dict) else None
            name = f"{section}.{key}" if key else section
            there = value[key] if key else value
            here = mine[section][key] if key else mine.get(section)
            raise UserError(f"distill.precomputed: {path} was computed over other data or settings ({name}={there} "
                            f"there, {here} here)")


class _Store(nn.Module):
    """The stored outputs as buffers (they move with `.to(device)`), and the key → row index."""

    def __init__(self, path: str, kinds: list[list[str]]):
        super().__init__()
        tensors = load_file(str(Path(path) / FILES[0]))
        self.index = {bytes(k): i for i, k in enumerate(tensors.pop("keys").numpy())}
        self.kinds = kinds
        for name, t in tensors.items():
            self.register_buffer(name.replace(".", "_"), t, persistent=False)

    def get(self, k: int, j: int):
        return getattr(self, f"t{k}_{j}")


def stored_teacher(path: str, m: dict, paths: list[str]) -> Teacher:
    """A Teacher of `paths` (some or all of the store's) whose outputs are looked up by each row's key
    in the store at `path` (manifest `m`)."""
    stored = [t["from"] for t in m["teachers"]]
    order = [stored.index(p) for p in paths]

    def read(store: _Store, batch: dict):
        keys = row_keys(batch)
        try:
            rows = torch.tensor([store.index[k] for k in keys], device=batch["pixel_values"].device)
        except KeyError:
            missing = sum(k not in store.index for k in keys)
            raise UserError(f"distill.precomputed: {path} holds no teacher outputs for {missing} of this batch's "
                            f"{len(keys)} records (computed over other records: more steps or other data?); "
                            "precompute with this run's settings") from None
        return [tuple(None if kind == "none" else store.get(k, j)[rows] if kind == "row" else store.get(k, j)
                      for j, kind in enumerate(store.kinds[k])) for k in order]

    return Teacher(_Store(path, m["outputs"]), read)
