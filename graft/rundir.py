"""A run directory: the resolved config, the tokenizer, checkpoints, metrics, eval results, report.

    DIR/config.yaml  DIR/tokenizer.json  DIR/checkpoints/step_XXXXXXXX/  DIR/metrics.jsonl
    DIR/tb/  DIR/eval.json  DIR/report.md  DIR/loss.png
"""

from __future__ import annotations

from pathlib import Path

from graft import config as config_mod
from graft.config import Config
from graft.data.processor import Processor
from graft.data.tokenizer import ChatTokenizer
from graft.errors import UserError
from graft.models.vlm import VLM
from graft.train import checkpoint


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.tokenizer_path = self.path / "tokenizer.json"
        self.checkpoints = self.path / "checkpoints"
        self.eval_path = self.path / "eval.json"

    def require(self) -> "RunDir":
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not a graft run directory (no config.yaml)")
        return self

    def config(self) -> Config:
        return config_mod.load(self.config_path)

    def tokenizer(self) -> ChatTokenizer:
        return ChatTokenizer.load(self.tokenizer_path)

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.checkpoints)

    def load(self) -> tuple[Config, ChatTokenizer, VLM, Path]:
        """Config, tokenizer and the model with the latest checkpoint's weights (eval mode, CPU)."""
        self.require()
        cfg, tok = self.config(), self.tokenizer()
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise UserError(f"{self.path} has no complete checkpoint under checkpoints/")
        model = build_model(cfg, tok)
        checkpoint.load_weights(model, ckpt)
        return cfg, tok, model.eval(), ckpt


def build_model(cfg: Config, tok: ChatTokenizer) -> VLM:
    if cfg.lm.vocab_size == 0:
        cfg.lm.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.lm.vocab_size < len(tok):
        raise UserError(f"lm.vocab_size={cfg.lm.vocab_size} is smaller than the tokenizer's {len(tok)}")
    return VLM(cfg.vision, cfg.connector, cfg.lm, tok.image)


def build_processor(cfg: Config, tok: ChatTokenizer, model: VLM) -> Processor:
    return Processor(tok, cfg.vision.image_size, model.num_image_tokens, cfg.lm.max_seq_len)
