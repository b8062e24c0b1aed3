"""Small builders shared by the tests."""

import shutil
from pathlib import Path

from graft.data.processor import Processor
from graft.data.shapes import ShapesWorld
from graft.data.tokenizer import ChatTokenizer, world_corpus
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import LMConfig
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM

_TOK = None


def tokenizer() -> ChatTokenizer:
    global _TOK
    if _TOK is None:
        _TOK = ChatTokenizer.train(world_corpus(ShapesWorld(), n=500), 384)
    return _TOK


def tiny_vlm(kind: str = "mlp") -> tuple[VLM, Processor]:
    tok = tokenizer()
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate_size=64)
    lm = LMConfig(vocab_size=len(tok), hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)
    model = VLM(vision, ConnectorConfig(kind), lm, tok.image)
    return model, Processor(tok, 32, model.num_image_tokens, 128)


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a shared run (conftest's `shared_run`), for a test that writes into it."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst
