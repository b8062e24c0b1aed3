"""FLOPs of one training step, counting vision *and* language work, for MFU.

`MeasuredFlops` is what the trainer uses: it counts the real forward and backward of a micro-batch
with torch's `FlopCounterMode`, once per batch shape (and set of trainable parameters), for any
design. The counter has no formula for the fused CPU attention kernel, so its terms are added here
(the same ones as for the GPU kernels). It counts attention over the whole row (causal and
document masks are not subtracted), as torch's counter does.

The hand formulas below (`vlm_step_flops`, `dual_step_flops`) stay as a cross-check in the tests.
Matmul FLOPs: 2 x params x tokens forward. Backward costs 2x forward for a part whose weights
train, 1x for a frozen part that still passes gradients down (its input needs a gradient), 0 for
a frozen part at the bottom of the graph. Attention scores add 4·c·d per layer forward for a
token that attends to c positions (c = T for bidirectional attention; for the LM, the token's
index in its own conversation + 1, so padding and the other conversations of a packed row are
not counted). Embedding lookups are free; the LM head is a matmul.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from graft.losses import weighted
from graft.objectives import StepLosses

aten = torch.ops.aten


class MeasuredFlops:
    """Training FLOPs (forward + backward) of a micro-batch, counted once per shape and cached; a
    frozen teacher's forward FLOPs (graft/objectives.py) are counted apart (`teacher`)."""

    def __init__(self):
        self.cache: dict[tuple, int] = {}
        self.taught: dict[tuple, int] = {}

    def __call__(self, model, batch: dict, losses: StepLosses | None = None) -> int:
        key = self._key(model, batch)
        if key not in self.cache:
            self.cache[key] = count_step(model, batch, losses)
        return self.cache[key]

    def step(self, model, batches: list[dict], sharded: bool = False, losses: StepLosses | None = None) -> int:
        """FLOPs of a step's micro-batches. `sharded` (FSDP2): a counting forward gathers weights,
        so every process counts whenever any one meets a new shape."""
        keys = [self._key(model, b) for b in batches]
        if sharded:
            new = torch.tensor([int(any(k not in self.cache for k in keys))])
            dist.all_reduce(new, op=dist.ReduceOp.MAX)
            if new.item():
                self.cache |= {k: count_step(model, b, losses) for k, b in zip(keys, batches)}
        return sum(self(model, b, losses) for b in batches)

    def teacher(self, losses: StepLosses, batches: list[dict]) -> int:
        """Forward FLOPs of the step's frozen teacher (0 without one): not training FLOPs of the model."""
        if losses.teacher is None:
            return 0
        for b in batches:
            key = self._key(losses.teacher.module, b)
            if key not in self.taught:
                with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
                    losses.teach(b)
                self.taught[key] = counter.get_total_flops()
        return sum(self.taught[self._key(losses.teacher.module, b)] for b in batches)

    @staticmethod
    def _key(model, batch: dict) -> tuple:
        trainable = tuple(name for name, p in model.named_parameters() if p.requires_grad)
        return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items())), hash(trainable)


def count_step(model, batch: dict, losses: StepLosses | None = None) -> int:
    """FLOPs of one forward and backward of `model` on `batch` — its own losses and, with `losses`,
    the design's objectives (a teacher's forward is not counted: `MeasuredFlops.teacher`). Leaves
    no gradient behind (run it where gradients are about to be zeroed anyway) and the buffers as
    they were."""
    losses = losses or StepLosses(model)
    taught = losses.teach(batch)  # outside the counter
    # Eager under the counter: torch.compile does not trace under a dispatch mode, and a compiled
    # block first called under one would stay uncompiled for the rest of the run.
    buffers = [(b, b.clone()) for b in model.buffers()]  # state a forward may move (MoE expert loads)
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        loss = weighted(losses.losses(model, batch, taught), losses.counts(batch))
        if loss.requires_grad:
            loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # counting leaves no trace
        for buffer, before in buffers:
            buffer.copy_(before)
    return counter.get_total_flops()


def _as_raw(formula):
    """torch's registered formulas already take tensors; mark them so FlopCounterMode does not
    wrap them a second time."""
    def raw(*args, **kwargs):
        return formula(*args, **kwargs)

    raw._get_raw = True
    return raw


_CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _as_raw(sdpa_flop),
                  aten._scaled_dot_product_flash_attention_for_cpu_backward: _as_raw(sdpa_backward_flop)}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _passes(trainable: bool, needs_input_grad: bool) -> int:
    return 1 + (1 if needs_input_grad else 0) + (1 if trainable else 0)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def causal_context(input_ids: torch.Tensor, pad_id: int, position_ids: torch.Tensor | None = None) -> int:
    """Σ over the real (non-pad) tokens of the positions each attends to causally: its index in its
    own conversation + 1 (`position_ids` of a packed row, the column of a padded one)."""
    real = input_ids != pad_id
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return int(((position_ids + 1) * real).sum())


def _tower(vit, images: int, layers) -> tuple[float, bool]:
    """FLOPs of `layers` of a ViT over `images` images, and whether its output needs gradients. The
    patch embedding sits at the bottom (no input gradient); the blocks above it pass gradients
    down whenever anything below them trains."""
    P, d = vit.num_patches, vit.cfg.hidden_size
    pe_train = _trainable(vit.embeddings.patch_embedding)
    layers_train = any(_trainable(l) for l in layers)
    embed = 2 * images * _params(vit.embeddings.patch_embedding) * P * _passes(pe_train, False)
    # Inside 2·(...): params·tokens, plus 2·T²·d per attention layer (4·T²·d forward FLOPs).
    blocks = 2 * images * (sum(_params(l) for l in layers) * P + len(layers) * 2 * P * P * d)
    return embed + blocks * _passes(layers_train, pe_train), pe_train or layers_train


def vlm_step_flops(model, images: int, lm_tokens: int, lm_context: int) -> float:
    """FLOPs for `images` images and `lm_tokens` LM positions attending to `lm_context` positions in all."""
    vit, lm, conn = model.vision, model.lm, model.connector
    v_layers = vit.encoder.layers[: vit.cfg.feature_layer % len(vit.encoder.layers) + 1]
    vision, v_grad = _tower(vit, images, v_layers)
    conn_train = _trainable(conn)
    connector = 2 * images * _params(conn) * model.num_image_tokens * _passes(conn_train, v_grad)
    lm_params = sum(_params(l) for l in lm.layers) + lm.lm_head.weight.numel()
    attn = len(lm.layers) * 2 * lm_context * lm.hidden_size  # 4·c·d per token and layer, inside 2·(...)
    # The token embedding sits below the blocks: if it trains, they pass gradients down too.
    below = conn_train or v_grad or _trainable(lm.embed_tokens)
    language = 2 * (lm_tokens * lm_params + attn) * _passes(_trainable(lm), below)
    return float(vision + connector + language)


def dual_step_flops(model, pairs: int) -> float:
    """FLOPs for `pairs` image–text pairs through a dual encoder (texts at full padded length)."""
    vit = model.vision
    tower, v_grad = _tower(vit, pairs, list(vit.encoder.layers))
    pool_train = _trainable(model.image_pool) or _trainable(model.image_proj)
    # The attention-pooling head (MAP) runs once per image, except its keys and values: per patch.
    kv = 2 * vit.cfg.hidden_size ** 2 if _params(model.image_pool) else 0
    head = 2 * pairs * (_params(model.image_pool) + kv * (vit.num_patches - 1) + _params(model.image_proj))
    image = tower + head * _passes(pool_train, v_grad)
    if model.cfg.shared_tower:  # CLIPPO: the rendered text goes through the same tower
        return float(2 * image)
    tt, L, dt = model.text, model.text.cfg.max_len, model.text.cfg.hidden_size
    attn = len(tt.encoder.layers) * 2 * L * L * dt  # every position scored, causal or not
    below = _trainable(tt.token_embedding)
    text = 2 * pairs * (_params(tt.encoder) * L + attn + _params(model.text_proj)) * _passes(_trainable(tt), below)
    return float(image + text)
