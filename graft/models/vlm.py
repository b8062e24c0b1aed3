"""The prefix-fusion VLM (LLaVA-style): VisionEncoder → Connector → tokens spliced into the LM input.

forward: embed the text → encode the images → project → scatter the image tokens into the
placeholder positions → decode → loss on answer tokens only (labels = -100 elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graft.errors import UserError
from graft.losses import IGNORE, at_least_fp32, lm_loss_sum, supervised
from graft.models.connectors import ConnectorConfig, build_connector
from graft.models.decoder import KVCache, LanguageModel, Layout, LMConfig
from graft.models.image_layout import CellEmbedding, item_mask, mrope_positions
from graft.models.modality import IMAGES, Modality
from graft.models import cell_head, spatial_head
from graft.models.vit import VisionConfig, ViT


class VLM(nn.Module):
    def __init__(
        self,
        vision: VisionConfig | nn.Module,
        connector: ConnectorConfig,
        lm: LMConfig | nn.Module,
        image_token_id: int,
        modality: Modality = IMAGES,
    ):
        """`vision` / `lm` are configs of graft's own ViT / decoder, or ready modules with the same
        interface (e.g. the Hugging Face backbones of `models/hf_backbones.py`; a series tower,
        models/series.py, with `modality` TIME_SERIES: its items come under their own batch key and
        fill their own placeholder token, `image_token_id`)."""
        super().__init__()
        self.image_token_id, self.modality = image_token_id, modality
        self.vision = vision if isinstance(vision, nn.Module) else ViT(vision)
        # LMConfig and LM modules both have .hidden_size; built in this order (vision, connector,
        # LM) so that a seed gives the same initial weights as before modules could be passed in.
        self.connector = build_connector(connector, self.vision.embed_dim, lm.hidden_size, self.vision.num_patches)
        self.lm = lm if isinstance(lm, nn.Module) else LanguageModel(lm)
        lm_cfg = self.lm.cfg if isinstance(self.lm, LanguageModel) else None
        self.cells = None  # lm.image_cells; built last: without it, a seed's weights are as before
        if lm_cfg is not None and lm_cfg.image_cells:
            self.cells = CellEmbedding(self.image_grid, lm_cfg.hidden_size, lm_cfg.init_std or lm_cfg.hidden_size**-0.5)
        self.spatial_head: spatial_head.SpatialHead | None = None  # data.spatial_compare (`with_heads`)
        self.cell_head: cell_head.CellHead | None = None  # data.cell_targets (`with_heads`)
        # The connector reads encoder-layer features (before post_layernorm, as HF LLaVA does),
        # so the post norm is unused here; frozen so it never needs a gradient.
        self.vision.post_layernorm.requires_grad_(False)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders the processor must write per image."""
        return self.tokens_per_image

    @property
    def tokens_per_image(self) -> int:
        """Image features the LM reads per image (in its sequence, or Flamingo's through cross-attention)."""
        return self.connector.num_tokens(self.vision.num_patches)

    def part_modules(self, part: str) -> list[str]:
        """The submodules (by dotted name) that make up a part of `train.freeze` / `train.init_parts`;
        `lm_image`: the LM's modules of the image tokens' own (`lm.modality_norms` / `modality_ffn`)."""
        if part == "lm_image":
            return [f"lm.{name}" for name, _ in self.lm.named_modules() if name.endswith("_image")]
        return [part]

    def freeze(self, parts: list[str]) -> None:
        """Freeze the parts; freezing `lm` leaves its image modules (new parameters) training
        unless `lm_image` is frozen too."""
        for part in parts:
            names = self.part_modules(part)
            if not names:
                raise UserError(f"train.freeze: {part}: this model has none (see lm.modality_norms, lm.modality_ffn)")
            for name in names:
                self.get_submodule(name).requires_grad_(False)
        if "lm" in parts and "lm_image" not in parts:
            for name in self.part_modules("lm_image"):
                self.get_submodule(name).requires_grad_(True)

    @property
    def image_grid(self) -> int | None:
        """The side of one image's square grid of tokens, or None when its tokens have no grid."""
        side = math.isqrt(self.num_image_tokens)
        return side if self.connector.grid and side * side == self.num_image_tokens else None

    def image_tokens(self, pixel_values: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """(B_img, N, D_lm): what an image becomes in the LM's input; with per-item `counts` (B_img,)
        (series of different lengths, padded), item i's first counts[i] tokens are its own."""
        if counts is None:
            tokens = self.connector(self.vision.features(pixel_values))
            return tokens if self.cells is None else self.cells(tokens)
        return self.connector(self.vision.features(pixel_values, counts=counts))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_tokens: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features at the placeholders: (B, T, D_lm). The images come as
        pixels or, already encoded (to reuse one image across many texts), as `image_tokens`; image k
        fills the k-th run of N placeholders (of counts[k], given per-item `counts`), reading the rows
        left to right, top to bottom. A batch without images (text-only rows) does not run the tower."""
        embeds = self.lm.embed_tokens(input_ids)  # (B, T, D_lm)
        if image_tokens is None and (pixel_values is None or pixel_values.shape[0] == 0):
            image_tokens = embeds.new_zeros(0, self.num_image_tokens, embeds.shape[-1])
        elif image_tokens is None:
            image_tokens = self.image_tokens(pixel_values, counts)  # (B_img, N, D_lm)
        slots = input_ids == self.image_token_id
        n_images, n = image_tokens.shape[:2]
        if counts is not None:  # each item's own tokens, in order: (Σ counts, D_lm)
            image_tokens = image_tokens[torch.arange(n, device=counts.device) < counts[:, None]]
        if torch.compiler.is_compiling():  # inside a graph: the same check, without a host sync
            torch._assert_async(slots.sum() == n_images * n, "image placeholders and image features differ")
        else:
            _check_placeholders(slots, n_images, n, counts)
        return embeds.masked_scatter(slots[..., None], image_tokens.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, labels=None, cache: KVCache | None = None,
                image_tokens: torch.Tensor | None = None, answers_only: bool = False,
                position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                hidden: dict | None = None, compare_labels: torch.Tensor | None = None,
                cell_labels: torch.Tensor | None = None, **items):
        """Returns (logits (B, T, vocab), {"lm": Σ answer-token losses, and the LM's auxiliary
        losses} or {} without labels). With `labels` and `answers_only` (how the trainer calls it:
        the design's `train_inputs`) the LM head and loss run only where an answer token is
        predicted, and no logits are returned: the same loss for fewer FLOPs. The images come as
        `pixel_values` or encoded as `image_tokens` (see `embed`). `position_ids`, `doc_ids`: of
        packed rows (data/packing.py), for the built-in decoder. `hidden` {layer: None}: filled
        with those LM layers' outputs (the built-in decoder). `items`: another modality's inputs
        under its batch key (a series' `series_values`), in place of `pixel_values`, and their
        per-item token counts where they differ (`series_counts`, models/modality.py).
        `compare_labels`: the targets of the spatial head (`data.spatial_compare`), its loss `compare`;
        `cell_labels`: the cell head's (`data.cell_targets`), its loss `cells`."""
        pixel_values, counts = self._items(pixel_values, items)
        aux: dict = {}
        lm_args = dict(self.lm_inputs(input_ids, pixel_values, image_tokens, cache, position_ids, doc_ids, counts),
                       aux=aux)
        last = len(self.lm.layers) - 1 if self.spatial_head is not None and labels is not None else None
        if last is not None:  # the head reads the last layer
            hidden = {} if hidden is None else hidden
            hidden.setdefault(last, None)
        if hidden is not None:
            lm_args["hidden"] = hidden
        if labels is not None and answers_only:
            logits, losses = None, {"lm": self._supervised_loss(lm_args, labels)}
        else:
            logits = self.lm(**lm_args)
            if labels is None:
                return logits, {}
            losses = {"lm": lm_loss_sum(logits, labels)}
        if last is not None:
            aux["compare"] = self.spatial_head.loss_sum(hidden[last], compare_labels)
        if self.cell_head is not None:
            aux["cells"] = self.cell_head.loss_sum(lm_args["inputs_embeds"], cell_labels)
        return logits, {**losses, **aux}

    def _items(self, pixel_values, items: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The tower's inputs (`pixel_values`, or this model's modality's batch key) and their
        per-item token counts (None: all alike)."""
        m = self.modality
        unknown = set(items) - {m.inputs, m.counts}
        if unknown:
            raise TypeError(f"VLM.forward got {sorted(unknown)}; its items come as pixel_values or {m.inputs}, "
                            f"with {m.counts}")
        return items.get(m.inputs, pixel_values), items.get(m.counts)

    def lm_inputs(self, input_ids, pixel_values, image_tokens, cache: KVCache | None, position_ids=None,
                  doc_ids=None, counts: torch.Tensor | None = None) -> dict:
        """The decoder's inputs for a batch: the image tokens spliced into the text's embeddings, and
        the rows' `Layout` (`layout`)."""
        layout = self.layout(input_ids == self.image_token_id, position_ids, doc_ids, cache, counts)
        return {"inputs_embeds": self.embed(input_ids, pixel_values, image_tokens, counts), "cache": cache,
                "layout": layout}

    def layout(self, slots: torch.Tensor, position_ids, doc_ids, cache: KVCache | None,
               counts: torch.Tensor | None = None) -> Layout:
        """The rows' `Layout`: packed rows' positions and documents, which tokens are an item's
        (`slots`), and, composed in at prefill, the built-in decoder's image settings
        `lm.image_attention` / `lm.image_positions` (models/image_layout.py)."""
        layout = Layout(position_ids, doc_ids, slots.long() * self.modality.id)
        cfg = self.lm.cfg if isinstance(self.lm, LanguageModel) else None
        bidirectional, mrope = cfg and cfg.image_attention == "bidirectional", cfg and cfg.image_positions == "mrope"
        if not (bidirectional or mrope) or (cache is not None and cache.seen() > 0):
            return layout  # plain causal 1-D; a decoding step's new tokens are text
        if bidirectional:
            layout.visible = item_mask(slots, self.num_image_tokens if counts is None else counts)
        if mrope:
            B, T = slots.shape
            positions = torch.arange(T, device=slots.device).expand(B, T) if position_ids is None else position_ids
            layout.position_ids = mrope_positions(positions, slots, self.image_grid)
        return layout

    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, vocab) of one more token per row (B, 1) after what `cache` holds."""
        return self.lm(input_ids=ids, cache=cache)

    def _supervised_loss(self, lm_args: dict, labels: torch.Tensor) -> torch.Tensor:
        """`lm_loss_sum` with the LM head and the loss computed only at the positions that predict an
        answer token (13 % of a demo batch's), the built-in decoder skipping the others' head."""
        targets = labels[:, 1:]
        at = nn.functional.pad(targets != IGNORE, (0, 1))  # position t predicts token t + 1
        if isinstance(self.lm, LanguageModel):
            logits = self.lm(**lm_args, head_at=at)
        else:  # an HF decoder computes every position's logits
            logits = self.lm(**lm_args)[at]
        return nn.functional.cross_entropy(at_least_fp32(logits), targets[targets != IGNORE], reduction="sum")

    def loss_counts(self, input_ids, labels, **batch) -> dict[str, int]:
        """What each loss of `forward` sums over: the supervised (answer) tokens; the LM's auxiliary
        losses, every position."""
        counts = {"lm": int(supervised(labels)), **dict.fromkeys(self.lm.aux_losses, input_ids.numel())}
        if self.spatial_head is not None:
            counts["compare"] = spatial_head.counted(batch.get("compare_labels"))
        if self.cell_head is not None:
            counts["cells"] = cell_head.counted(batch.get("cell_labels"))
        return counts

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, max_new_tokens: int = 32, eos_id: int = -1,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 on_token=None, **items) -> list[list[int]]:
        """Decoding with a KV cache for prompts of equal length (B, T); returns new ids per row.
        Greedy at temperature 0; above it, samples from softmax(logits / temperature) cut to the
        top_p nucleus, drawing from `generator`. `on_token((B,) ids)` sees each step's tokens as they
        come (a server streaming them). `items`: another modality's batch keys (see `forward`)."""
        cache = self.lm.new_cache()
        logits, _ = self(input_ids, pixel_values, cache=cache, **items)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = []
        for _ in range(max_new_tokens):
            last = logits[:, -1]  # (B, vocab)
            nxt = last.argmax(-1) if temperature <= 0 else sample(last, temperature, top_p, generator)  # (B,)
            out.append(torch.where(done, eos_id, nxt))
            if on_token is not None:
                on_token(out[-1])
            done |= nxt == eos_id
            if bool(done.all()):
                break
            logits = self.decode(nxt[:, None], cache)
        rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(input_ids.shape[0])]
        return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits (B, vocab): from softmax(logits / temperature), keeping only
    the most likely tokens whose mass reaches top_p (nucleus sampling, Holtzman et al. 2020 §3.1)."""
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        ranked, order = probs.sort(-1, descending=True)
        ranked = ranked * (ranked.cumsum(-1) - ranked < top_p)  # the mass before a kept token is < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_placeholders(slots: torch.Tensor, n_images: int, n: int, counts: torch.Tensor | None = None) -> None:
    """Scattering image features into placeholders that are not whole images would silently
    misalign text and images: fail, saying where (cheaply: the first row whose placeholders are not
    whole images, else the images per row). With per-item `counts`, their sum must be the slots'."""
    n_slots = int(slots.sum())
    if counts is not None:
        if n_slots != int(counts.sum()):
            raise ValueError(f"item placeholders and item features differ: {n_slots} placeholder tokens in the batch "
                             f"vs {int(counts.sum())} features of {n_images} items (token counts {counts.tolist()})")
        return
    if n_slots == n_images * n:
        return
    per_row = slots.sum(1).tolist()
    odd = next((r for r, c in enumerate(per_row) if n and c % n), None)
    where = (f"row {odd} has {per_row[odd]} placeholder tokens, not a multiple of {n} per image"
             if odd is not None else f"the rows hold {[c // n for c in per_row] if n else per_row} images' placeholders")
    raise ValueError(
        f"image placeholders and image features differ: {n_slots} placeholder tokens in the "
        f"batch vs {n_images * n} image features ({n_images} images x {n} tokens); {where}"
    )
