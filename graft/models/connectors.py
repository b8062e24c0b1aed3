"""Connectors: map vision features (B, P, D_vision) to LM-space tokens (B, N, D_lm).

To add one: write an `nn.Module` taking `(vision_dim, lm_dim, cfg)` with that forward and a
`num_tokens(num_patches)` rule (and, if its settings constrain the patch grid, a static
`check(cfg, num_patches)` raising UserError) and a class attribute `grid` (whether its tokens
keep the image's row-major grid), add its name to `CONNECTORS` and the
`ConnectorConfig` fields it reads to `KEYS`. The VLM asks the connector how many image tokens it
makes, and the processor writes that many placeholders. A field set for a kind that does not read
it is an error.
"""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from graft.errors import UserError
from graft.models.compress import AvgPoolProjector, PixelShuffleProjector
from graft.models.connector_config import ConnectorConfig
from graft.models.projectors import LinearProjector, MLPProjector
from graft.models.qformer import QFormerConnector
from graft.models.resampler import ResamplerConnector


def check_connector(cfg: ConnectorConfig, num_patches: int | None = None, lm_dim: int | None = None) -> None:
    """The kind exists, reads every field set away from its default, and fits the patch grid
    and the LM width (each checked when known)."""
    if cfg.kind not in CONNECTORS:
        raise UserError(f"connector.kind={cfg.kind!r} is not one of {', '.join(CONNECTORS)}")
    for name, value in _changed(cfg, ConnectorConfig()):
        if name != "kind" and name.split(".")[0] not in KEYS.get(cfg.kind, ()):
            raise UserError(f"connector.{name}={value} is not read by connector.kind={cfg.kind} "
                            f"(it reads: {', '.join(KEYS.get(cfg.kind, ())) or 'no other key'})")
    check = getattr(CONNECTORS[cfg.kind], "check", None)
    if check is not None and num_patches is not None:
        check(cfg, num_patches, lm_dim=lm_dim)


def _changed(cfg, default, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, value) of every field of `cfg` set away from `default`, into nested sections."""
    out = []
    for f in fields(cfg):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if hasattr(value, "__dataclass_fields__"):
            out += _changed(value, base, f"{prefix}{f.name}.")
        elif value != base:
            out.append((f"{prefix}{f.name}", value))
    return out


CONNECTORS = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "avgpool": AvgPoolProjector,
    "resampler": ResamplerConnector,
    "qformer": QFormerConnector,
}
KEYS = {  # the ConnectorConfig fields each kind reads, besides `kind`
    "pixel_shuffle": ("scale_factor",),
    "avgpool": ("tokens",),
    "resampler": ("latents", "layers", "heads"),
    "qformer": ("qformer", "init_from"),
}


def per_patch(kind: str) -> bool:
    """Whether connector `kind` maps each patch to one token on its own (linear, mlp)."""
    return getattr(CONNECTORS[kind], "per_patch", False)


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_patches: int | None = None) -> nn.Module:
    check_connector(cfg, num_patches, lm_dim)
    return CONNECTORS[cfg.kind](vision_dim, lm_dim, cfg)  # PyTorch's default (fan-in scaled) init
