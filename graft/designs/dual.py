"""Dual encoders (CLIP, SigLIP, CLIPPO, LiT): an image tower and a text tower (or one tower for
both, CLIPPO) trained with a contrastive loss. Its world batches and token count serve the other
design that embeds (qformer_stage1)."""

from __future__ import annotations

from graft.data.contrastive import ContrastiveProcessor, ContrastiveStream
from graft.data.loader import PureBatches
from graft.data.stream import make_world
from graft.designs.registry import EMBEDS, Design, register
from graft.designs.shared import validate_vision
from graft.errors import UserError
from graft.models.dual_encoder import PARTS, ContrastiveConfig, DualEncoder
from graft.models.text_encoder import TextConfig


def build(cfg, tok, pretrained: bool = True):
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.text.vocab_size < len(tok):
        raise UserError(f"text.vocab_size={cfg.text.vocab_size} is smaller than the tokenizer's {len(tok)}")
    return DualEncoder(cfg.vision, cfg.text, cfg.contrastive, tok.eos)


def processor(cfg, tok, model):
    c = cfg.contrastive
    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.text.max_len, c.shared_tower, c.render_font_size)


def world_batches(cfg, proc, rt):
    t = cfg.train
    return PureBatches(ContrastiveStream(make_world(cfg), proc, t.batch_size, t.grad_accum, rt.rank, rt.world_size))


def tokens(batch, pad: int) -> int:
    ids = batch.get("input_ids")  # CLIPPO batches carry rendered text, no token ids
    return 0 if ids is None else int((ids != pad).sum())


def validate(cfg) -> None:
    TextConfig.check(cfg.text)
    ContrastiveConfig.check(cfg.contrastive)
    validate_vision(cfg)
    if cfg.contrastive.shared_tower and "text" in cfg.train.freeze:
        raise UserError("train.freeze: 'text' has no tower of its own when contrastive.shared_tower=true (CLIPPO)")


register("dual", Design(frozenset({EMBEDS}), ("vision", "text", "contrastive"), PARTS, build, processor, world_batches,
                        tokens, validate, losses=("itc",)))
