"""`ConnectorConfig`: the `connector` config section (what models/connectors.py builds, and checks
with `check_connector`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from graft.models.qformer_config import QFormerConfig


@dataclass
class ConnectorConfig:
    kind: str = "mlp"  # linear | mlp (one token per patch); more in CONNECTORS
    scale_factor: int = 2  # pixel_shuffle: r x r patches become one token (P → P / r²)
    tokens: int = 16  # avgpool: image tokens after average pooling (a square number)
    latents: int = 16  # resampler: learned queries, one image token each
    layers: int = 2  # resampler: cross-attention layers
    heads: int = 4  # resampler: attention heads
    qformer: QFormerConfig = field(default_factory=QFormerConfig)  # qformer: the Q-Former's architecture
    # qformer: a stage-1 run (model=qformer_stage1) whose image encoder and Q-Former this one starts
    # from (BLIP-2 stage 2); its architecture must be this config's (checked before training)
    init_from: str | None = None
