"""Checkpoints: written by every process, complete or absent, readable on any number of processes.

Layout of `checkpoints/step_<8 digits>/`:
    model/*.safetensors   the weights: one file per process holding its shard (tied weights stored
                          under each name), written with torch.distributed.checkpoint (DCP) in the
                          Hugging Face safetensors layout
    optim/*.safetensors   the optimizer's tensors (AdamW moments and steps), keyed by parameter name
    rng/rank_<r>.safetensors   each process's random-number generator states
    train_state.json      the optimizer's hyperparameters and the learning-rate schedule
    meta.json             step, number of processes, samples seen, global and micro-batch size,
                          data position: written last

No file is a pickle. DCP reads any shard layout into any other, so a run saved on N processes
resumes on M, DDP or FSDP2 alike. All processes write into a temporary directory; once every one
has finished, process 0 writes meta.json, flushes the directory and renames it: a crash at any
moment leaves the previous checkpoint and a temporary directory, never a partial one under a final
name. A directory that is under a final name but damaged (a file removed, truncated or garbled) is
skipped with a warning naming it, and the run resumes from the one before.

Asynchronous saves (`train.async_save`): a save returns once the state is copied; one background
thread writes the files (DCP's save over a separate gloo group, so that its collectives never mix
with training's), and the checkpoint completes (meta.json, rename) at a later step boundary, once
every process has written its files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model, save_file
from torch.distributed.checkpoint import (
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from graft.errors import UserError
from graft.models import modality

_NAME = re.compile(r"^step_(\d{8})$")
_TMP = ".tmp-step_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints under their final name with meta.json, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    """The newest checkpoint whose files are all readable; damaged ones are skipped with a warning."""
    for ckpt in reversed(complete_checkpoints(root)):
        problem = damage(ckpt)
        if problem is None:
            return ckpt
        if _rank() == 0:
            print(f"graft: skipping damaged checkpoint {ckpt}: {problem}", file=sys.stderr, flush=True)
    return None


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None: meta.json readable, and every safetensors
    file's header readable and its size what the header says."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json unreadable ({type(e).__name__})"
    if (ckpt / "model.safetensors").is_file():  # the single-file layout of earlier graft versions
        return _file_damage(ckpt / "model.safetensors")
    for part in ("model", "optim", "rng"):
        files = sorted((ckpt / part).glob("*.safetensors")) if (ckpt / part).is_dir() else []
        if not files:
            return f"no {part}/*.safetensors"
        for f in files:
            problem = _file_damage(f)
            if problem:
                return f"{part}/{problem}"
    try:
        json.loads((ckpt / "train_state.json").read_text())["param_groups"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"train_state.json unreadable ({type(e).__name__})"
    return None


def _file_damage(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            if header <= 0 or header > 100 << 20:
                return f"{path.name}: bad header"
            info = json.loads(fh.read(header))
        end = max((v["data_offsets"][1] for k, v in info.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != 8 + header + end:
            return f"{path.name}: {path.stat().st_size} bytes, its header says {8 + header + end}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name}: unreadable ({type(e).__name__})"
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Saver:
    """Writes checkpoints from every process; with `async_save` the files are written in the
    background and `poll()` completes them at a later step boundary."""

    def __init__(self, root: Path, keep: int, async_save: bool = False, keep_steps: tuple[int, ...] = ()):
        self.root, self.keep, self.async_save = root, keep, async_save
        self.kept = {step_dir(root, k).name for k in keep_steps}  # never pruned (train.keep_steps)
        self.pending = None  # (futures, tmp, final, meta)
        self.group = self.pool = None
        if async_save:
            self.pool = ThreadPoolExecutor(max_workers=1)  # one writer: its collectives stay in order
            if dist.is_initialized():
                self.group = dist.new_group(backend="gloo")  # background collectives off the training group

    def save(self, step: int, model, optimizer, scheduler, meta: dict) -> None:
        self.wait()  # one save in flight at a time
        final = step_dir(self.root, step)
        if final.exists():
            return
        tmp = self.root / f"{_TMP}{step:08d}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        save_file(rng_state(), str(tmp / "rng" / f"rank_{_rank()}.safetensors"))
        state = {"param_groups": optim_sd["param_groups"], "scheduler": scheduler.state_dict()}
        meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1, **meta}
        parts = {"model": untied(model_sd), "optim": _optimizer_tensors(optim_sd)}
        if self.async_save:  # a copy of the state is written by one background thread
            staged = {name: _copied(sd) for name, sd in parts.items()}
            future = self.pool.submit(self._write, staged, tmp)
            self.pending = ([future], tmp, final, meta, state)
            return
        self._write(parts, tmp)
        self._finish(tmp, final, meta, state)

    def _write(self, parts: dict, tmp: Path) -> None:
        """Every process writes its shard of each part (collective over `self.group`)."""
        for name, sd in parts.items():
            with warnings.catch_warnings():  # "saving in a single process" is what we mean
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(sd, storage_writer=_writer(tmp / name), process_group=self.group,
                         no_dist=not dist.is_initialized())

    def poll(self) -> None:
        """Complete an asynchronous save whose files are written on every process."""
        if self.pending is None:
            return
        done = torch.tensor([int(all(f.done() for f in self.pending[0]))])
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        futures, tmp, final, meta, state = self.pending
        self.pending = None
        for f in futures:
            f.result()
        self._finish(tmp, final, meta, state)

    def _finish(self, tmp: Path, final: Path, meta: dict, state: dict) -> None:
        _barrier()  # every process's files are written
        if _rank() == 0:
            (tmp / "train_state.json").write_text(json.dumps(state))
            (tmp / "meta.json").write_text(json.dumps(meta))
            _fsync_tree(tmp)
            os.replace(tmp, final)
            for old in [c for c in complete_checkpoints(self.root) if c.name not in self.kept][: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()


def _copied(tree):
    """The state's tensors copied (DTensors stay sharded), so that training may change the originals."""
    if isinstance(tree, dict):
        return {k: _copied(v) for k, v in tree.items()}
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


def _writer(path: Path) -> HuggingFaceStorageWriter:
    return HuggingFaceStorageWriter(str(path), save_distributed=True)


def untied(state_dict: dict) -> dict:
    """The state dict without the second name of tied weights (the LM head tied to the token
    embedding): safetensors stores a tensor once. Loading the first name fills both."""
    seen, out = set(), {}
    for name, t in state_dict.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if local.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _optimizer_tensors(optim_sd: dict) -> dict:
    """The optimizer state's tensors as {"<param name>.<key>": tensor} (DCP flattens nested dicts)."""
    return {name: dict(values) for name, values in optim_sd["state"].items()}


def clean_partial(root: Path) -> None:
    """Remove temporary directories left by a crash during a write."""
    if root.is_dir():
        for p in root.glob(f"{_TMP}*"):
            shutil.rmtree(p, ignore_errors=True)


def _load(state_dict: dict, path: Path) -> None:
    with warnings.catch_warnings():  # "loading in a single process" is what we mean
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state_dict, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not dist.is_initialized())


def _saved(path: Path) -> dict:
    """Every tensor a DCP safetensors folder holds: name → its metadata (full `size`, `properties.dtype`),
    as DCP's reader assembles it from the files' headers."""
    return HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata


def _names(path: Path) -> dict[str, tuple]:
    """name → full shape of every tensor in a DCP safetensors folder."""
    return {k: tuple(m.size) for k, m in _saved(path).items()}


def read_model(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full weights (those whose name starts with `prefix`) of a checkpoint, on the CPU."""
    if (ckpt / "model.safetensors").is_file():
        return {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith(prefix)}
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for k, m in _saved(ckpt / "model").items() if k.startswith(prefix)}
    if tensors:
        _load(tensors, ckpt / "model")
    return tensors


def image_twins(model, part: str = "") -> dict[str, str]:
    """Parameters of the model's image modules (`lm.modality_*`) → the text parameters they start
    as, named within the submodule `part` if given: a checkpoint without them (saved before they
    were switched on) fills them from those (`fill_twins`)."""
    twins = modality.image_twins(model)
    prefix = f"{part}." if part else ""
    return {k.removeprefix(prefix): v.removeprefix(prefix) for k, v in twins.items() if k.startswith(prefix)}


@torch.no_grad()
def fill_twins(module, twins: dict[str, str], names: list[str]) -> None:
    """The parameters `names` of `module` set to their twins' values (just loaded)."""
    params = dict(module.named_parameters())
    for name in names:
        params[name].copy_(params[twins[name]])


def load_weights(model, ckpt: Path) -> None:
    """The checkpoint's weights into `model` (one process; unsharded)."""
    twins = image_twins(model)
    if (ckpt / "model.safetensors").is_file():
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
        filled = [k for k in missing if k in twins]
    else:
        if not (ckpt / "model").is_dir():
            raise UserError(f"checkpoint weights not found: {ckpt / 'model'}")
        own, saved = untied(model.state_dict()), _names(ckpt / "model")
        missing, unexpected = [k for k in own if k not in saved], [k for k in saved if k not in own]
        bad = [k for k in own if k in saved and tuple(own[k].shape) != saved[k]]
        if bad:
            raise UserError(f"{ckpt} has {bad[0]} of shape {saved[bad[0]]}, this model's is {tuple(own[bad[0]].shape)}")
        filled = [k for k in missing if k in twins]  # image modules the saved run did not have
        if len(filled) == len(missing):
            _load({k: v for k, v in own.items() if k not in filled}, ckpt / "model")
    missing = [k for k in missing if k not in filled]
    if missing or unexpected:
        raise UserError(f"{ckpt} does not fit this model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    fill_twins(model, twins, filled)  # ... start as the text modules just loaded


def read_meta(ckpt: Path) -> dict:
    """A complete checkpoint's meta.json: step, processes, samples seen, global and micro-batch."""
    return json.loads((ckpt / "meta.json").read_text())


def load_train_state(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Model, optimizer, schedule and this process's RNG from `ckpt`, whatever the number of
    processes that saved it; returns meta.json. No pickle is read."""
    if (ckpt / "model.safetensors").is_file():
        raise UserError(f"{ckpt} is a checkpoint of an earlier graft version: it can be evaluated and "
                        "exported, but training cannot resume from it")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    saved = _names(ckpt / "model")
    own = untied(model_sd)  # shares storage with model_sd: loading it fills the tied names too
    missing = [k for k in own if k not in saved]
    if missing:
        raise UserError(f"{ckpt} does not fit this model (missing {sorted(missing)[:3]})")
    _load(own, ckpt / "model")
    tensors = _optimizer_tensors(optim_sd)
    if not tensors:  # a fresh optimizer has no state yet: make it from the saved shapes
        tensors = _fresh_optimizer_state(model_sd, optimizer, _names(ckpt / "optim"))
    _load(tensors, ckpt / "optim")
    state = json.loads((ckpt / "train_state.json").read_text())
    set_state_dict(model, optimizer, model_state_dict=model_sd,
                   optim_state_dict={"state": tensors, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    meta = json.loads((ckpt / "meta.json").read_text())
    rng = ckpt / "rng" / f"rank_{_rank()}.safetensors"
    if rng.is_file():
        set_rng_state(load_file(str(rng)))
    return meta


def _fresh_optimizer_state(model_sd: dict, optimizer, saved: dict[str, tuple]) -> dict:
    """Zero optimizer state shaped like this process's parameters, for DCP to fill in."""
    state = {}
    for name, value in model_sd.items():
        keys = [k.removeprefix(f"{name}.") for k in saved if k.startswith(f"{name}.") and k.count(".") == name.count(".") + 1]
        if keys:
            state[name] = {k: torch.zeros(saved[f"{name}.{k}"]) if saved[f"{name}.{k}"] == () else torch.zeros_like(value)
                           for k in keys}
    return state


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
