"""Parts of a model taken from other runs: a tower (`vision.init_from`), any part
(`train.init_parts`), a BLIP-2 stage-1 run's image encoder and Q-Former (`connector.init_from`)
and EVE's frozen vision teacher (`eve.teacher`). build.assemble applies them; each checks shapes
and names and fails in one line naming the setting.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from graft.config import Config
from graft.errors import UserError
from graft.models.hf_backbones import HFVisionTower, resolve_vision
from graft.models.vit import ViT, VisionConfig
from graft.rundir import RunDir
from graft.trainer import checkpoint

VISION_ARCH = ("image_size", "patch_size", "hidden_size", "layers", "heads", "intermediate_size", "layer_norm_eps")


def adopt_vision_arch(cfg: Config) -> list[str]:
    """Take the tower's architecture from the run `vision.init_from` names; returns the keys changed."""
    src = RunDir(cfg.vision.init_from).require().config().vision
    changed = []
    for key in VISION_ARCH:
        if getattr(cfg.vision, key) != getattr(src, key):
            changed.append(f"vision.{key}={getattr(src, key)}")
            setattr(cfg.vision, key, getattr(src, key))
    return changed


def load_vision(model, run_path: str, image_head: bool = False) -> Path:
    """Copy the ViT weights (`vision.*`) of a run's latest checkpoint, VLM or dual encoder, into `model.vision`.

    image_head: also copy a dual encoder's pooling head and projection (`image_pool.*`, `image_proj.*`),
    so the whole image side is the run's — LiT locks it all (big_vision `lit_coco.py` freezes `img/.*`).
    """
    modules = ["vision", "image_pool", "image_proj"] if image_head else ["vision"]
    return load_modules(model, modules, run_path, "vision.init_from")


def load_modules(model, modules: list[str], run_path: str, key: str) -> Path:
    """Copy the weights of `modules` (dotted names, e.g. ["connector"]) from a run's latest
    checkpoint into `model`; every shape must match and every weight be found (else a UserError
    naming `key`)."""
    ckpt = RunDir(run_path).require().latest_checkpoint()
    if ckpt is None:
        raise UserError(f"{key}: {run_path} has no complete checkpoint")
    weights = checkpoint.read_model(ckpt)
    for part in modules:
        sub = {k.removeprefix(f"{part}."): v for k, v in weights.items() if k.startswith(f"{part}.")}
        own = model.get_submodule(part).state_dict()
        for name, value in sub.items():  # load_state_dict would raise a multi-line RuntimeError
            if name in own and own[name].shape != value.shape:
                raise UserError(f"{key}: {ckpt} has {part}.{name} of shape {tuple(value.shape)}, "
                                f"this model's is {tuple(own[name].shape)}")
        missing, unexpected = model.get_submodule(part).load_state_dict(sub, strict=False)
        tied = set(own) - set(checkpoint.untied(own))  # second names of tied weights (the LM head): filled
        twins = checkpoint.image_twins(model, part)
        filled = [k for k in missing if k in twins]  # image modules the run lacks start as their text twins
        missing = [k for k in missing if k not in tied and k not in twins]
        if missing or unexpected or not sub:
            raise UserError(f"{key}: {ckpt} holds no matching {part} "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        checkpoint.fill_twins(model.get_submodule(part), twins, filled)
    return ckpt


def load_stage1(model, path: str, key: str = "connector.init_from") -> None:
    """Copy a stage-1 run's image encoder (`vision.*`) and Q-Former query side (`qformer.*`: ln_vision,
    queries, layers; not the text FFNs nor the text embeddings) into a VLM whose connector is a
    Q-Former (stage 2). The run was checked to be a stage-1 run of this architecture (graft/designs/vlm.py)."""
    ckpt = load_modules(model, ["vision"], path, key)
    sub = {k.removeprefix("qformer."): v for k, v in checkpoint.read_model(ckpt, "qformer.").items()}
    try:
        missing, unexpected = model.connector.load_state_dict(sub, strict=False)
    except RuntimeError as e:
        raise UserError(f"{key}: {path} does not fit this Q-Former ({str(e).splitlines()[1].strip()[:160]})") from None
    text_ffn = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")  # stage 2 has no text side
    if [m for m in missing if not m.startswith("language_projection.")] or \
            [u for u in unexpected if not text_ffn.match(u)]:
        raise UserError(f"{key}: {RunDir(path).path} holds no matching Q-Former "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def teacher_config(path: str) -> VisionConfig:
    """The config of the vision tower at `path` (an HF SigLIP/CLIP folder with config.json, or a
    graft run), its weights left unread: what a student sizes its alignment head by."""
    if (Path(path) / "config.json").is_file():
        return resolve_vision(VisionConfig(hf_path=path))
    return RunDir(path).require().config().vision


def load_teacher(path: str) -> tuple[nn.Module, VisionConfig]:
    """A frozen vision tower and its config (its image size, mean and std): an HF SigLIP/CLIP folder
    (config.json) or a graft run's ViT."""
    cfg = teacher_config(path)
    tower = HFVisionTower.load(cfg, pretrained=True) if cfg.hf_path else ViT(cfg)
    if not (Path(path) / "config.json").is_file():  # a graft run: its trained tower
        holder = nn.Module()
        holder.vision = tower
        load_modules(holder, ["vision"], path, "eve.teacher")
    return tower.eval().requires_grad_(False), cfg
