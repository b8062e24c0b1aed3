"""Checkpoints: complete or absent, never half-written.

Layout of `checkpoints/step_<8 digits>/`:
    model.safetensors  every model weight (tied weights stored once)
    train_state.pt     optimiser, scheduler and RNG states, read back with weights_only=True
    meta.json          step and data position

A checkpoint is written under a temporary name, flushed to disk, then renamed: a crash at any
moment leaves either the previous checkpoint or the new one, never a partial one under a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from graft.errors import UserError

_NAME = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, model, optimizer, scheduler, meta: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    if final.exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    torch.save(state, tmp / "train_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
    _fsync_tree(tmp)
    os.replace(tmp, final)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(root: Path) -> None:
    """Remove temporary directories left by a crash during a write."""
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


def load_weights(model, ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise UserError(f"checkpoint weights not found: {path}")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_train_state(ckpt: Path, optimizer, scheduler) -> dict:
    """Restore optimiser, scheduler and RNG; returns meta.json. No pickle: weights_only=True."""
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((ckpt / "meta.json").read_text())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
