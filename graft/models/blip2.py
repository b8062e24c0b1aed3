"""BLIP-2 stage 1: a Q-Former learns to read an image encoder with three objectives at once.

Li et al. 2023, "BLIP-2", §3.2 and Fig. 2. The image encoder (graft's ViT, or an HF tower; frozen
or trained per `train.freeze`) gives patch features; `ln_vision` normalises them; N learned
queries read them through the Q-Former (models/qformer.py), whose text side shares the
self-attention. Per image–caption pair:

- ITC (image–text contrastive): z_i = the N query outputs projected and L2-normalised (N, E),
  t_j = the text's [CLS] output projected and normalised (E); s_ij = max_q z_iq·t_j, the best query
  per text; the symmetric InfoNCE of CLIP on s (`itc_loss`), queries and text apart (unimodal
  masks), gathered across processes like `clip_loss`.
- ITM (image–text matching): per pair, one hard negative text per image and one hard negative
  image per text, sampled with probability softmax(s) over the batch excluding the positive (and
  texts identical to it); [queries; text] attend to each other (bidirectional); a 2-way head on
  the mean over the query outputs; cross-entropy over the 3B pairs (B positives, 2B negatives).
  Negatives come from this process's micro-batch (LAVIS samples from the gathered batch).
- ITG (image-grounded text generation): [queries; [DEC] caption] with queries attending among
  themselves (bidirectional) and the text causal and seeing every query; next-token
  cross-entropy on the caption tokens (and <eos>).

The Q-Former's text vocabulary is the tokenizer's plus two task tokens appended after it, [CLS]
(ITC, ITM) and [DEC] (ITG), written by the model in front of the caption (BLIP-2 uses BERT's
[CLS] and an added [DEC]). `encode_image` (one embedding per query) / `encode_text` and
`similarity` (ITC's best query per text) are what zero-shot and retrieval rank by
(eval/zero_shot.py, eval/retrieval.py), as for the other dual models.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graft.losses import (
    IGNORE,
    global_mean,
    local_and_gathered,
    as_local_sum,
    at_least_fp32,
    lm_loss_sum,
)
from graft.models.qformer import (
    QFormerConfig,
    QueryEncoder,
    TextEmbeddings,
    init_std,
    init_weights,
)
from graft.models.modality import IMAGES, Modality
from graft.models.vit import VisionConfig, ViT

PARTS = ("vision", "qformer", "heads")


def itc_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
             rank: int = 0, world_size: int = 1, group=None) -> torch.Tensor:
    """BLIP-2's ITC: CLIP's symmetric InfoNCE on the best query per text.

    image_features (b, N, E) L2-normalised per query, text_features (b, E) L2-normalised, s =
    logit_scale (already exponentiated). With l_ij = s · max_q x_iq·y_j over the global batch of
    M = b x world_size pairs,

        L = 1/2 · [ 1/M Σ_i -log softmax_j(l_ij)[i]  +  1/M Σ_j -log softmax_i(l_ij)[j] ]

    Across processes as `clip_loss`: the other ranks' features are all-gathered with autograd,
    each rank computes its own rows of both directions, and the value is the global batch's.
    Memory: per rank two (b, M, N) similarity blocks before the max, O(b·M·N); gathering O(M·N·E).
    In at least fp32 (fp64 stays fp64).
    """
    x, y, offset = local_and_gathered(image_features, text_features, rank, world_size, group)
    (b, n, e), m = image_features.shape, y.shape[0]
    targets = torch.arange(offset, offset + b, device=text_features.device)
    # Products as q @ kᵀ (as clip_loss): their backward hands the gathered features contiguous
    # gradients. An einsum's need not be, and torch.distributed.nn's all_gather then sends the
    # wrong numbers back to their owners on gloo (measured: gradients off by up to 0.9).
    i2t = (at_least_fp32(image_features).reshape(b * n, e) @ y.T).view(b, n, m).amax(1)  # (b, M)
    t2i = (at_least_fp32(text_features) @ x.reshape(m * n, e).T).view(b, m, n).amax(2)  # (b, M)
    i2t, t2i = logit_scale * i2t, logit_scale * t2i
    local = (F.cross_entropy(i2t, targets, reduction="sum") + F.cross_entropy(t2i, targets, reduction="sum")) / 2
    return global_mean(local, b * world_size, world_size, group)


def hard_negatives(sims: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image i one negative text, for each text j one negative image, drawn with
    probability softmax over the row of `sims` (b, b: image i vs text j) with the positive and any
    text identical to it excluded (where a row has nothing else, only the positive is).

    The draws use a generator seeded from the batch's token ids, so the negatives are a pure
    function of the batch: a resumed run draws what an uninterrupted one did, and the trainer's
    extra forward to count FLOPs does not move the global RNG."""
    b = sims.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sims.device)
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (b, b): identical captions
    exclude = torch.where(same.all(1, keepdim=True), eye, same)  # a row of duplicates: only the positive
    gen = torch.Generator(device=sims.device).manual_seed(zlib.crc32(input_ids.cpu().numpy().tobytes()))
    text_for_image = torch.multinomial(sims.masked_fill(exclude, -math.inf).softmax(1), 1, generator=gen)[:, 0]
    image_for_text = torch.multinomial(sims.T.masked_fill(exclude.T, -math.inf).softmax(1), 1, generator=gen)[:, 0]
    return text_for_image, image_for_text


def itg_mask(n_queries: int, real: torch.Tensor) -> torch.Tensor:
    """(B, N + T, N + T), True = may attend: queries see the queries, text sees every query and the
    real text tokens up to itself. real (B, T): True at non-pad text tokens."""
    B, T = real.shape
    size = n_queries + T
    allowed = torch.zeros(size, size, dtype=torch.bool, device=real.device)
    allowed[:, :n_queries] = True
    allowed[n_queries:, n_queries:] = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    keys = torch.cat([real.new_ones(B, n_queries), real], dim=1)  # (B, N + T)
    return allowed[None] & keys[:, None, :]


class QFormerStage1(nn.Module):
    """Image encoder + Q-Former with ITC/ITM/ITG heads (parts: vision, qformer, heads)."""

    matches = True  # has an image–text matching head: `match`

    def __init__(self, vision: VisionConfig | nn.Module, cfg: QFormerConfig, vocab_size: int, pad_id: int,
                 modality: Modality = IMAGES):
        """`vision`: the ViT's config or a ready tower of `modality`'s items (a series tower: series–text
        pairs, their items under `series_values`)."""
        super().__init__()
        QFormerConfig.check(cfg)
        self.cfg, self.pad_id, self.vocab_size = cfg, pad_id, vocab_size
        self.cls_id, self.dec_id = vocab_size, vocab_size + 1  # task tokens after the tokenizer's ids
        self.modality = modality
        self.vision = vision if isinstance(vision, nn.Module) else ViT(vision)
        self.vision.post_layernorm.requires_grad_(False)  # the Q-Former reads `features` (as a VLM connector)
        d = cfg.hidden_size
        self.qformer = QueryEncoder(cfg, self.vision.embed_dim, text=True)
        self.embeddings = TextEmbeddings(cfg, vocab_size + 2, cfg.max_text_len + 1)
        self.vision_projection = nn.Linear(d, cfg.embed_dim)
        self.text_projection = nn.Linear(d, cfg.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.lm_head = nn.Linear(d, vocab_size)  # ITG predicts the tokenizer's ids only
        for m in (self.embeddings, self.vision_projection, self.text_projection, self.itm_head, self.lm_head):
            m.apply(lambda x: init_weights(x, init_std(cfg)))
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # BLIP-2: temperature 0.07; (1,) for FSDP2

    def part_modules(self, part: str) -> list[str]:
        """The submodules (by attribute name) that make up a part of `train.freeze` / `train.init_parts`."""
        return {"vision": ["vision"], "qformer": ["qformer", "embeddings"],
                "heads": ["vision_projection", "text_projection", "itm_head", "lm_head"]}[part]

    def freeze(self, parts: list[str]) -> None:
        for part in parts:
            for name in self.part_modules(part):
                getattr(self, name).requires_grad_(False)

    # ---- the two sides, alone (unimodal masks) ----------------------------------------------

    def image_side(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised patch features (B, P, d_v), per-query embeddings (B, N, E) L2-normalised)."""
        image = self.qformer.image(self.vision.features(pixel_values))
        queries = self.qformer.query_tokens.expand(image.shape[0], -1, -1).to(image.dtype)
        out = self.qformer.qformer(queries, self.qformer.num_queries, image)
        return image, F.normalize(self.vision_projection(out), dim=-1)

    def _text(self, first: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[first] + ids (B, 1 + L) and where they are real (not pad)."""
        ids = torch.cat([input_ids.new_full((input_ids.shape[0], 1), first), input_ids], dim=1)
        return ids, ids != self.pad_id

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) caption ids → (B, E): the [CLS] output, projected, L2-normalised (text alone)."""
        ids, real = self._text(self.cls_id, input_ids)
        out = self.qformer.qformer(self.embeddings(ids), 0, mask=real)
        return F.normalize(self.text_projection(out[:, 0]), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor | None = None, **items) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, E): one L2-normalised embedding per query (ITC's image side)."""
        return self.image_side(self._items(pixel_values, items))[1]

    def _items(self, pixel_values, items: dict) -> torch.Tensor:
        """The tower's inputs: `pixel_values`, or this model's modality's batch key."""
        unknown = set(items) - {self.modality.inputs}
        if unknown:
            raise TypeError(f"got {sorted(unknown)}; the items come as pixel_values or {self.modality.inputs}")
        return items.get(self.modality.inputs, pixel_values)

    @staticmethod
    def similarity(image_queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """ITC's score, what zero-shot and retrieval rank by: (n, N, E) x (m, E) → (n, m), the
        best query per text."""
        return torch.einsum("nqe,me->nmq", image_queries, text).amax(-1)

    # ---- training ---------------------------------------------------------------------------

    def _world(self) -> dict:
        if self.training and dist.is_available() and dist.is_initialized():
            return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
        return {}

    def forward(self, pixel_values=None, input_ids=None, **items):
        """Returns (per-query image embeddings (B, N, E), {"itc", "itm", "itg": local sums over
        what `loss_counts` says}): ITC's value divided by the global pairs is the global batch's.
        `items`: another modality's batch key (`series_values`) in place of `pixel_values`."""
        pixel_values = self._items(pixel_values, items)
        B = pixel_values.shape[0]
        if B < 2:
            raise ValueError("ITM needs at least 2 pairs per micro-batch for its negatives")
        image, image_emb = self.image_side(pixel_values)
        text_emb = self.encode_text(input_ids)
        scale, world = self.logit_scale.exp().clamp(max=100.0), self._world()
        itc = itc_loss(image_emb, text_emb, scale, **world)
        with torch.no_grad():
            neg_text, neg_image = hard_negatives(scale * self.similarity(image_emb, text_emb), input_ids)
        losses = {"itc": as_local_sum(itc, B, B * world.get("world_size", 1)),
                  "itm": self._itm(image, input_ids, neg_text, neg_image),
                  "itg": self._itg(image, input_ids)}
        return image_emb, losses

    def _joint(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[queries; text] over `image`: (B, N + T, d)."""
        queries = self.qformer.query_tokens.expand(ids.shape[0], -1, -1).to(image.dtype)
        embeds = torch.cat([queries, self.embeddings(ids).to(image.dtype)], dim=1)
        return self.qformer.qformer(embeds, self.qformer.num_queries, image, mask)

    def match(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Image–text matching, row by row: (B, 3, S, S) and (B, L) → (B,) log P(match), the ITM head
        averaged over the queries as in training."""
        image, _ = self.image_side(pixel_values)
        ids, real = self._text(self.cls_id, input_ids)
        keys = torch.cat([real.new_ones(ids.shape[0], self.qformer.num_queries), real], dim=1)
        logits = self.itm_head(self._joint(image, ids, keys)[:, :self.qformer.num_queries]).mean(1)
        return F.log_softmax(at_least_fp32(logits), -1)[:, 1]

    def _itm(self, image, input_ids, neg_text, neg_image) -> torch.Tensor:
        """Σ over 3B pairs (positive; image i with text neg_text[i]; image neg_image[j] with text j)."""
        B, N = input_ids.shape[0], self.qformer.num_queries
        ids, real = self._text(self.cls_id, torch.cat([input_ids, input_ids[neg_text], input_ids]))
        # index_select, not image[neg_image]: indexing's backward adds into the gradient with atomic adds
        # on CPU threads, in no fixed order (runs would differ in the last bits); index_select's does not
        images = torch.cat([image, image, image.index_select(0, neg_image)])
        keys = torch.cat([real.new_ones(3 * B, N), real], dim=1)  # bidirectional, pad keys masked
        logits = self.itm_head(self._joint(images, ids, keys)[:, :N]).mean(1)  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return F.cross_entropy(at_least_fp32(logits), labels, reduction="sum")

    def _itg(self, image, input_ids) -> torch.Tensor:
        """Σ over caption tokens (<eos> included) of -log p(token | [DEC], earlier tokens, queries)."""
        N = self.qformer.num_queries
        ids, real = self._text(self.dec_id, input_ids)
        logits = self.lm_head(self._joint(image, ids, itg_mask(N, real))[:, N:])  # (B, 1 + L, V)
        labels = ids.masked_fill(~real, IGNORE)
        labels[:, 0] = IGNORE  # [DEC] is never a target (lm_loss_sum shifts by one anyway)
        return lm_loss_sum(logits, labels)

    def loss_counts(self, input_ids, **batch) -> dict[str, int]:
        """What each loss of `forward` sums over: pairs (ITC), pairs x 3 (ITM), caption tokens (ITG)."""
        B = input_ids.shape[0]
        return {"itc": B, "itm": 3 * B, "itg": int((input_ids != self.pad_id).sum())}
