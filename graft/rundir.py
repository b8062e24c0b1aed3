"""A run directory: the resolved config, the tokenizer, checkpoints, metrics, eval results, report.

    DIR/config.yaml  DIR/tokenizer.json  DIR/checkpoints/step_XXXXXXXX/  DIR/metrics.jsonl
    DIR/tb/  DIR/eval.json  DIR/report.md  DIR/loss.png

With `lm.hf_path` the tokenizer is the LM's own, saved as a transformers folder DIR/hf_tokenizer/.
Only the directory's layout lives here: loading a run's model is build.load_run, copying a run's
parts into another model is parts.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from graft import atomic
from graft import config as config_mod
from graft.config import Config
from graft.data.hf_tokenizer import HFChatTokenizer
from graft.data.tokenizer import ChatTokenizer
from graft.errors import UserError
from graft.trainer import checkpoint


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
        """The run's config.yaml, parsed and type-checked (build.load_run also validates it)."""
        return config_mod.read(self.config_path)

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
