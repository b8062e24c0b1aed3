"""The series tower: a multichannel time series → a sequence of patch features, like a ViT's.

    (B, C, L) → normalised per recording and channel (RevIN without its affine, Kim et al. 2022),
                the statistics kept as one more token (each channel's mean and log std, embedded
                linearly: a posture is a mean, the gravity the accelerometer reads at rest)
              → patches of `patch` steps every `stride` steps, all channels together, each linearly
                embedded (a Conv1d, as PatchTST / GPT4TS embed patches) + a learned position table
              → `layers` pre-LN encoder layers (the ViT's own layer, models/vit.py) → (B, P, D)

It offers what a VLM asks of a tower (`features`, `embed_dim`, `num_patches`, `post_layernorm`), so
its tokens enter the language model through the same connectors as an image's; their modality id
is SERIES. With `layers: 0` the patches' embeddings are the features (GPT4TS feeds them to the LM
directly).

`channel_independent` (PatchTST, Nie et al. 2023): each channel is patched on its own by one shared
embedding, plus a learned embedding of its channel, and its patches are encoded apart from the other
channels' (a batch of B x C sequences); the LM gets every channel's tokens, patch by patch
(position 0 of channels 0..C-1, then position 1, ...), C times as many, after the statistics token
(which is embedded, not encoded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import UserError
from graft.models.vit import Encoder, VisionTower, _init_weights
from graft.models.wrn1d import WRNTower


@dataclass
class SeriesConfig:
    channels: int = 6
    length: int = 256  # steps of the longest recording the tower reads (shorter ones: fewer tokens)
    patch: int = 16  # steps per patch
    stride: int = 16  # steps between patch starts (< patch: overlapping patches)
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    layer_norm_eps: float = 1e-6
    normalise: bool = True  # per recording and channel: zero mean, unit variance (RevIN), + a statistics token
    max_gap: int = 16  # longest run of missing (NaN) steps the processor fills by interpolation
    channel_independent: bool = False  # PatchTST: each channel's patches embedded and encoded on their own
    tower: str = "patch"  # patch (the transformer above) | wrn (a 1-D wide ResNet, models/wrn1d.py)
    wrn_depth: int = 16  # WRN-d-k: d = 6n + 4 layers (16: WRN16-k, 28: WRN28-k)
    wrn_width: int = 3  # k, the widening factor (WRN16-3, WRN28-1)

    @staticmethod
    def check(cfg: "SeriesConfig") -> None:
        if cfg.tower not in TOWERS:
            raise UserError(f"series.tower={cfg.tower!r} is not one of {', '.join(TOWERS)}")
        default, other = SeriesConfig(), "wrn" if cfg.tower == "patch" else "patch"
        for key in TOWER_KEYS[other]:  # the other tower's settings would change nothing
            if getattr(cfg, key) != getattr(default, key):
                raise UserError(f"series.{key} is read by series.tower={other}, not {cfg.tower}")
        if cfg.tower == "wrn" and (cfg.wrn_depth < 10 or (cfg.wrn_depth - 4) % 6 or cfg.wrn_width < 1):
            raise UserError(f"series.wrn_depth={cfg.wrn_depth} must be 6n + 4 (10, 16, 22, 28, ...) and "
                            f"series.wrn_width={cfg.wrn_width} >= 1")
        for key in ("channels", "length", "patch", "stride", "hidden_size", "heads"):
            if getattr(cfg, key) <= 0:
                raise UserError(f"series.{key}={getattr(cfg, key)} must be positive")
        if cfg.patch > cfg.length:
            raise UserError(f"series.patch={cfg.patch} is longer than series.length={cfg.length}")
        if cfg.hidden_size % cfg.heads:
            raise UserError(f"series.hidden_size={cfg.hidden_size} is not divisible by series.heads={cfg.heads}")
        if cfg.layers < 0 or cfg.max_gap < 0:
            raise UserError("series.layers and series.max_gap must be >= 0")

    def one_length(self) -> str | None:
        """Why recordings must have `length` steps with this tower (None: any length up to it)."""
        return "series.tower=wrn reads recordings of one length (its convolutions see past an end)" \
            if self.tower == "wrn" else None

    @property
    def num_patches(self) -> int:
        """Tokens of a recording of `length` steps (the most any has): its patches, and the
        statistics token when normalised."""
        return self.tokens(self.length)

    @property
    def per_patch(self) -> int:
        """Tokens per patch position: every channel's with `channel_independent`, else one."""
        return self.channels if self.channel_independent else 1

    def tokens(self, steps: int) -> int:
        """Tokens of a recording of `steps` steps (patch <= steps <= length)."""
        return ((steps - self.patch) // self.stride + 1) * self.per_patch + int(self.normalise)

    def steps(self, tokens: int) -> int:
        """The steps the patches of a recording of `tokens` tokens read (the recording's start)."""
        return self.patch + ((tokens - int(self.normalise)) // self.per_patch - 1) * self.stride


TOWERS = ("patch", "wrn")
TOWER_KEYS = {"patch": ("hidden_size", "layers", "heads", "intermediate_size", "layer_norm_eps", "channel_independent"),
              "wrn": ("wrn_depth", "wrn_width")}  # what only that tower reads


def series_tower(cfg: SeriesConfig) -> VisionTower:
    """The tower `series.tower` names."""
    return WRNTower(cfg) if cfg.tower == "wrn" else SeriesTower(cfg)


class SeriesTower(VisionTower):
    """A tower as the VLM asks of one (`VisionTower`: `cfg`, `features`, `embed_dim`, `num_patches`)."""

    def __init__(self, cfg: SeriesConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.channel_independent:  # one embedding for every channel's patches, and one per channel
            self.patch_embedding = nn.Conv1d(1, cfg.hidden_size, cfg.patch, stride=cfg.stride)
            self.channel_embedding = nn.Embedding(cfg.channels, cfg.hidden_size)
            self.position_embedding = nn.Embedding((cfg.length - cfg.patch) // cfg.stride + 1, cfg.hidden_size)
        else:
            self.patch_embedding = nn.Conv1d(cfg.channels, cfg.hidden_size, cfg.patch, stride=cfg.stride)
            self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.statistics = nn.Linear(2 * cfg.channels, cfg.hidden_size) if cfg.normalise else None
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.patch_embedding.weight, std=0.02)

    def features(self, series: torch.Tensor, layer: int | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, L) → the last encoder layer's output (or `layer`'s), no post norm: (B, P, D).
        `counts` (B,): each recording's tokens, when they differ (data/series_processor.py pads the
        shorter ones at the end): its statistics come from its own steps, and its tokens attend
        only to each other; a padded token's output is not a feature (VLM.embed skips it)."""
        x = series.to(self.patch_embedding.weight.dtype)
        valid = self._valid(counts, x.shape[-1])  # (B, 1, L) steps read, or None: all of them
        if self.cfg.channel_independent:
            return self._independent(x, valid, layer, counts)
        if self.statistics is not None:  # each recording and channel on its own scale (RevIN)
            mean, std = _statistics(x, valid)
            x = (x - mean) / std
            x = self.patch_embedding(x if valid is None else x * valid).transpose(1, 2)  # (B, P - 1, D)
            stats = self.statistics(torch.cat([mean, std.log()], 1).transpose(1, 2))  # (B, 1, D)
            x = torch.cat([stats, x], 1)
        else:
            x = self.patch_embedding(x).transpose(1, 2)  # (B, P, D)
        x = x + self.position_embedding.weight[: x.shape[1]]
        mask = None if valid is None else (torch.arange(x.shape[1], device=x.device) < counts[:, None])[:, None, None]
        stop = len(self.encoder.layers) if layer is None else layer % len(self.encoder.layers) + 1
        for block in self.encoder.layers[:stop]:
            x = block(x, mask=mask)
        return x

    def _independent(self, x: torch.Tensor, valid, layer: int | None, counts) -> torch.Tensor:
        """`features` of channel-independent patches: (B, stats + P · C, D), patch-major."""
        B, C, L = x.shape
        stats = None
        if self.statistics is not None:
            mean, std = _statistics(x, valid)
            x = (x - mean) / std
            stats = self.statistics(torch.cat([mean, std.log()], 1).transpose(1, 2))  # (B, 1, D)
        x = x if valid is None else x * valid
        h = self.patch_embedding(x.reshape(B * C, 1, L)).transpose(1, 2)  # (B·C, P, D), row b·C + c
        P = h.shape[1]
        h = h + self.position_embedding.weight[:P] + self.channel_embedding.weight.repeat(B, 1)[:, None]
        mask = None
        if valid is not None:  # each channel's own patches of each recording
            patches = (counts - int(self.cfg.normalise)) // C
            mask = (torch.arange(P, device=x.device) < patches.repeat_interleave(C)[:, None])[:, None, None]
        stop = len(self.encoder.layers) if layer is None else layer % len(self.encoder.layers) + 1
        for block in self.encoder.layers[:stop]:
            h = block(h, mask=mask)
        h = h.view(B, C, P, -1).transpose(1, 2).reshape(B, P * C, -1)  # patch by patch, channels within
        return h if stats is None else torch.cat([stats, h], 1)

    def _valid(self, counts: torch.Tensor | None, length: int) -> torch.Tensor | None:
        if counts is None or bool((counts == self.cfg.tokens(length)).all()):
            return None
        steps = self.cfg.steps(counts)  # a tensor of steps, as SeriesConfig.steps gives for an int
        return (torch.arange(length, device=counts.device) < steps[:, None])[:, None]

    def forward(self, series: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        return self.post_layernorm(self.features(series, counts=counts))


# The series.* keys an encoder-free model (SeriesPatches) reads; the others would have no effect.
PATCHES_READ = ("channels", "length", "patch", "stride", "normalise", "max_gap")  # `tower` neither


class SeriesPatches(SeriesTower):
    """The encoder-free stand-in for a series tower (Fuyu on series): `features` are the raw patches,
    each flattened (step, channel) after the per-recording normalisation, with the statistics (each
    channel's mean and log std, zero-padded to a patch's width) as the first token: as many tokens as
    the tower's, and nothing learned before the connector."""

    def __init__(self, cfg: SeriesConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.post_layernorm = nn.Identity()  # nothing after the last layer: there are no layers

    @property
    def embed_dim(self) -> int:
        return self.cfg.channels * self.cfg.patch

    def features(self, series: torch.Tensor, layer: int | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, L) → (B, P, C · patch); `counts` as for the tower (padded patches are not features)."""
        x = series.float()
        valid = self._valid(counts, x.shape[-1])
        stats = None
        if self.cfg.normalise:
            mean, std = _statistics(x, valid)
            x = (x - mean) / std
            stats = torch.cat([mean, std.log()], 1).transpose(1, 2)  # (B, 1, 2C)
        patches = x.unfold(-1, self.cfg.patch, self.cfg.stride)  # (B, C, P, patch)
        x = patches.permute(0, 2, 3, 1).flatten(2)  # (B, P, patch · C): step by step, channels within
        if stats is not None:
            x = torch.cat([nn.functional.pad(stats, (0, x.shape[-1] - stats.shape[-1])), x], 1)
        return x


def _statistics(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each recording's and channel's mean and std (B, C, 1) over its steps (`valid`, or all)."""
    if valid is None:
        return x.mean(-1, keepdim=True), (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()
    n = valid.sum(-1, keepdim=True)
    mean = (x * valid).sum(-1, keepdim=True) / n
    var = ((x - mean) ** 2 * valid).sum(-1, keepdim=True) / n
    return mean, (var + 1e-5).sqrt()
