"""The Q-Former's architecture (`QFormerConfig`): the `qformer` config section of BLIP-2 stage 1 and
`connector.qformer` of stage 2 (models/qformer.py builds it; models/connector_config.py holds it)."""

from __future__ import annotations

from dataclasses import dataclass

from graft.errors import UserError


@dataclass
class QFormerConfig:
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    queries: int = 8  # learned query tokens: the image tokens a stage-2 LM reads (BLIP-2: 32)
    cross_attention_frequency: int = 1  # cross-attention in layers 0, f, 2f, ... (BLIP-2: 2)
    layer_norm_eps: float = 1e-12  # BERT's
    # Stage 1 only (model=qformer_stage1): the width of the ITC embeddings (BLIP-2: 256) and the
    # caption tokens the text side reads (truncated, keeping <eos>; one [CLS]/[DEC] slot is added).
    embed_dim: int = 64
    max_text_len: int = 20

    ARCH = ("hidden_size", "layers", "heads", "intermediate_size", "queries", "cross_attention_frequency",
            "layer_norm_eps")  # what a stage-2 connector must share with the stage-1 run it loads

    @staticmethod
    def check(cfg: QFormerConfig, key: str = "qformer") -> None:
        for name in ("hidden_size", "layers", "heads", "intermediate_size", "queries", "cross_attention_frequency",
                     "embed_dim", "max_text_len"):
            if getattr(cfg, name) < 1:
                raise UserError(f"{key}.{name}={getattr(cfg, name)} must be at least 1")
        if cfg.hidden_size % cfg.heads:
            raise UserError(f"{key}.hidden_size={cfg.hidden_size} is not divisible by {key}.heads={cfg.heads}")
        if cfg.max_text_len < 2:
            raise UserError(f"{key}.max_text_len={cfg.max_text_len} must be at least 2 (a token and <eos>)")
