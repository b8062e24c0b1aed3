"""Training objectives, standalone: each states its maths and its memory cost.

clip_loss, siglip_loss: contrastive image–text losses, on one process or gathered across many.

lm_loss: next-token cross-entropy on the positions whose label is not -100 (the answer tokens).

Models return their objectives by name as *local sums* (`lm_loss_sum`, `as_local_sum`), and state
what each sum counts (`model.loss_counts(**batch)`); the trainer divides by the count summed over
micro-batches and processes, so that accumulation and N processes give one big batch's gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or in its own precision when higher (fp64 stays fp64: gradcheck can check a loss)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over supervised positions of -log p(labels[t+1] | tokens ≤ t): `lm_loss` before dividing by
    the number of supervised positions (`supervised(labels)`)."""
    logits = at_least_fp32(logits[:, :-1]).reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """How many positions `lm_loss_sum` sums over."""
    return (labels[:, 1:] != IGNORE).sum()


def as_local_sum(global_mean: torch.Tensor, local: int, total: int) -> torch.Tensor:
    """A loss over gathered features (value: the global batch's mean, gradient: this rank's share of
    it, as `clip_loss` / `siglip_loss` return it) as a local sum over `local` of `total` items:
    value mean x local, gradient total x the share, so that dividing by `total` restores both."""
    scaled = global_mean * total
    return scaled - (scaled - global_mean.detach() * local).detach()


def cosine_distance_sum(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ over rows of 1 - cos(student_i, target_i), in at least fp32: EVE's alignment of the LM's
    patch states (through a head) to a frozen teacher's patch features. `target` (any shape with
    as many elements) is reshaped to `student`'s (N, D). Memory: O(N·D)."""
    target = target.reshape(student.shape)
    return (1 - F.cosine_similarity(at_least_fp32(student), at_least_fp32(target), dim=-1)).sum()


def weighted(losses: dict, counts: dict, weights: dict | None = None) -> torch.Tensor:
    """Σ_name weight x local sum / count: the objective of named local-sum losses (weight 1 each
    unless given; counts as the trainer sums them over micro-batches and processes)."""
    weights = weights or dict.fromkeys(losses, 1.0)
    return sum(weights[name] * losses[name] / max(counts[name], 1) for name in weights)


def batch_loss(model, batch: dict) -> torch.Tensor:
    """A model's loss on one batch as one process would train on it: its named losses, each a mean."""
    _, losses = model(**batch)
    return weighted(losses, model.loss_counts(**batch))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over supervised positions of -log p(labels[t+1] | tokens ≤ t).

    logits (B, T, V), labels (B, T) aligned with the input ids (the shift happens here); labels are
    -100 on prompt, image and padding positions so only answer tokens are learned. Computed in fp32
    (fp64 logits: in fp64).
    Memory: one (B·T, V) fp32 copy of the logits.  If no position is supervised the loss is 0
    (with a gradient), never NaN.
    """
    logits = at_least_fp32(logits[:, :-1]).reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    n = (targets != IGNORE).sum()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return total / n.clamp(min=1)


# ---- contrastive losses (CLIP, SigLIP) ------------------------------------------------------------
#
# Both take L2-normalised features and work on one process or many. With world_size > 1 each rank
# passes its own slice of the global batch of N = b x world_size pairs; the other ranks' features
# are all-gathered *with autograd* (their gradients flow back to their owners), each rank computes
# the rows of the N x N logit matrix that belong to its b samples ("local loss"), and the per-rank
# sums are added up so that:
#   * the returned value is the loss of the whole global batch, identical on every rank;
#   * the gradient w.r.t. a rank's own features equals the one-process gradient for those rows;
#   * the gradient w.r.t. a replicated input (logit_scale, logit_bias) is this rank's share: the
#     sum over ranks is the one-process gradient. (So a DDP trainer, which averages gradients over
#     ranks, multiplies this loss by world_size before backward; see trainer/loop.py.)
# `chunk_size` > 0 computes the logits in blocks of that many rows (CLIP) or columns (SigLIP) and
# recomputes each block in the backward pass (activation checkpointing), bounding peak memory.


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              rank: int = 0, world_size: int = 1, group=None, chunk_size: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3).

    x_i, y_i: the L2-normalised image / text features of pair i, (N, D); s = logit_scale (already
    exponentiated). With l_ij = s · x_i·y_j,

        L = 1/2 · [ 1/N Σ_i -log softmax_j(l_ij)[i]  +  1/N Σ_j -log softmax_i(l_ij)[j] ]

    i.e. the mean of the image→text and text→image cross-entropies with the diagonal as targets.
    Memory: on each rank two (b, N) fp32 logit blocks and their softmax (b = N / world_size, the
    local-loss trick of open_clip), O(b·N); with chunk_size = c, O(c·N) at a time. Features
    gathered from other ranks add O(N·D).
    """
    x, y, offset = local_and_gathered(image_features, text_features, rank, world_size, group)
    b = image_features.shape[0]
    targets = torch.arange(offset, offset + b, device=image_features.device)
    i2t = _chunked(ce_rows, at_least_fp32(image_features), y, logit_scale, targets, chunk_size)
    t2i = _chunked(ce_rows, at_least_fp32(text_features), x, logit_scale, targets, chunk_size)
    return global_mean((i2t + t2i) / 2, b * world_size, world_size, group)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, *, rank: int = 0, world_size: int = 1, group=None,
                chunk_size: int = 0) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, Algorithm 1).

    With z_ij = +1 if i = j else -1, t = logit_scale (already exponentiated), b = logit_bias:

        L = -1/N Σ_i Σ_j log σ( z_ij · (t · x_i·y_j + b) )

    Every pair is an independent binary problem, so there is no softmax over the batch. On many
    ranks each rank scores its b images against all N gathered texts. Memory: one (b, N) fp32 logit
    block per rank, O(b·N); with chunk_size = c, O(b·c) at a time (the paper's chunked
    implementation bounds it the same way, passing text chunks around a ring instead of gathering
    them; gathering costs O(N·D) more, small next to the logits).
    """
    _, y, offset = local_and_gathered(None, text_features, rank, world_size, group)
    x = at_least_fp32(image_features)
    cols = torch.arange(y.shape[0], device=x.device)
    total = x.new_zeros(())
    step = chunk_size if chunk_size > 0 else y.shape[0]
    for start in range(0, y.shape[0], step):
        block = (y[start:start + step], cols[start:start + step])
        args = (x, *block, logit_scale, logit_bias, offset)
        total = total + (_checkpoint(_sigmoid_block, *args) if chunk_size > 0 else _sigmoid_block(*args))
    return global_mean(total, x.shape[0] * world_size, world_size, group)


def ce_rows(queries, keys, logit_scale, targets):
    """Σ over rows of -log softmax(s · q·kᵀ)[target]: (c, D) x (N, D) → scalar."""
    return F.cross_entropy(logit_scale * queries @ keys.T, targets, reduction="sum")


def _sigmoid_block(x, y_block, cols, logit_scale, logit_bias, offset: int):
    """Σ -log σ(z · (t · x·yᵀ + b)) over one (b, c) block; z = +1 where column = offset + row."""
    logits = logit_scale * x @ y_block.T + logit_bias  # (b, c)
    rows = torch.arange(x.shape[0], device=x.device) + offset
    z = torch.where(rows[:, None] == cols[None, :], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(z * logits).sum()


def _chunked(fn, queries, keys, logit_scale, targets, chunk_size: int):
    """fn summed over row blocks of `queries`, each block recomputed in backward when chunked."""
    if chunk_size <= 0 or chunk_size >= queries.shape[0]:
        return fn(queries, keys, logit_scale, targets)
    return sum(_checkpoint(fn, queries[i:i + chunk_size], keys, logit_scale, targets[i:i + chunk_size])
               for i in range(0, queries.shape[0], chunk_size))


def _checkpoint(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


def local_and_gathered(image_features, text_features, rank: int, world_size: int, group):
    """All ranks' image and text features (N, D) in rank order, and this rank's row offset."""
    if world_size == 1:
        x = None if image_features is None else at_least_fp32(image_features)
        return x, at_least_fp32(text_features), 0
    if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process group "
                         f"({dist.get_rank(group)} of {dist.get_world_size(group)})")
    gather = lambda t: torch.cat(dist_fn.all_gather(at_least_fp32(t).contiguous(), group=group))  # noqa: E731
    x = None if image_features is None else gather(image_features)
    return x, gather(text_features), rank * text_features.shape[0]


def global_mean(local_sum: torch.Tensor, n: int, world_size: int, group) -> torch.Tensor:
    """Σ_ranks local_sum / n as the value; the gradient flows through this rank's term only."""
    if world_size == 1:
        return local_sum / n

    total = local_sum.detach().clone()
    dist.all_reduce(total, group=group)
    return (local_sum + (total - local_sum.detach())) / n
