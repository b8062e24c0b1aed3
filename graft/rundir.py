"""A run directory: the resolved config, the tokenizer, checkpoints, metrics, eval results, report.

    DIR/config.yaml  DIR/tokenizer.json  DIR/checkpoints/step_XXXXXXXX/  DIR/metrics.jsonl
    DIR/tb/  DIR/eval.json  DIR/report.md  DIR/loss.png

With `lm.hf_path` the tokenizer is the LM's own, saved as a transformers folder DIR/hf_tokenizer/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from graft import atomic
from graft import config as config_mod
from graft.config import Config
from graft.data.hf_tokenizer import HFChatTokenizer
from graft.data.tokenizer import ChatTokenizer
from graft.designs import design
from graft.errors import UserError
from graft.models.hf_backbones import resolve_lm, resolve_vision
from graft.train import checkpoint


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.tokenizer_path = self.path / "tokenizer.json"
        self.hf_tokenizer_path = self.path / "hf_tokenizer"
        self.checkpoints = self.path / "checkpoints"
        self.eval_path = self.path / "eval.json"

    def require(self) -> "RunDir":
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not a graft run directory (no config.yaml)")
        return self

    def config(self) -> Config:
        return config_mod.load(self.config_path, sources=False)  # its weights are in its checkpoints

    def tokenizer(self) -> ChatTokenizer | HFChatTokenizer:
        if self.hf_tokenizer_path.is_dir():
            return HFChatTokenizer.load(self.hf_tokenizer_path)
        return ChatTokenizer.load(self.tokenizer_path)

    def has_tokenizer(self) -> bool:
        return self.tokenizer_path.is_file() or self.hf_tokenizer_path.is_dir()

    def save_tokenizer(self, tok) -> None:
        """Atomically: a kill while saving leaves no tokenizer (the next start writes it), never half of one."""
        if not isinstance(tok, HFChatTokenizer):
            atomic.write_text(self.tokenizer_path, tok.tok.to_str(pretty=True))
            return
        tmp = self.path / f".hf_tokenizer.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        os.replace(tmp, self.hf_tokenizer_path)  # has_tokenizer() was false: the target does not exist

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.checkpoints)

    def load(self) -> tuple[Config, ChatTokenizer, nn.Module, Path]:
        """Config, tokenizer and the model with the latest checkpoint's weights (eval mode, CPU)."""
        self.require()
        cfg, tok = self.config(), self.tokenizer()
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise UserError(f"{self.path} has no complete checkpoint under checkpoints/")
        from graft.build import assemble

        model = assemble(cfg, tok, init=False)  # every weight comes from the checkpoint
        checkpoint.load_weights(model, ckpt)
        return cfg, tok, model.eval(), ckpt


def resolve_backbones(cfg: Config, tok) -> Config:
    """Write the architecture of `vision.hf_path` / `lm.hf_path` folders into the config (in place)."""
    if cfg.vision.hf_path:
        cfg.vision = resolve_vision(cfg.vision)
    if cfg.lm.hf_path:
        cfg.lm = resolve_lm(cfg.lm, len(tok))
    return config_mod.validate(cfg)  # e.g. vision.feature_layer against the tower's real depth


def build_model(cfg: Config, tok, pretrained: bool = True):
    """The model of `cfg`'s design (graft/designs.py); HF backbones load their folder's weights
    unless pretrained=False."""
    return design(cfg.model).build(cfg, tok, pretrained)


def build_processor(cfg: Config, tok, model):
    """What turns records into the model's rows and batches, for `cfg`'s design."""
    return design(cfg.model).processor(cfg, tok, model)


# ---- vision.init_from: a tower from another run ---------------------------------------------------

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
