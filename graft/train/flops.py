"""FLOPs of one training step, counting vision *and* language work, for MFU.

Matmul FLOPs: 2 x params x tokens forward. Backward costs 2x forward for a part whose weights
train, 1x for a frozen part that still passes gradients down (its input needs a gradient), 0 for
a frozen part at the bottom of the graph. Attention scores add 4·c·d per layer forward for a
token that attends to c positions (c = T for bidirectional attention; for the LM, the token's
index in its own conversation + 1, so padding and the other conversations of a packed row are
not counted). Embedding lookups are free; the LM head is a matmul.
"""

from __future__ import annotations

import torch
from torch import nn


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


def vlm_step_flops(model, images: int, lm_tokens: int, lm_context: int) -> float:
    """FLOPs for `images` images and `lm_tokens` LM positions attending to `lm_context` positions in all."""
    vit, lm, conn = model.vision, model.lm, model.connector
    v_layers = vit.encoder.layers[: vit.cfg.feature_layer % len(vit.encoder.layers) + 1]
    v_params = sum(_params(l) for l in v_layers) + _params(vit.embeddings.patch_embedding)
    lm_train, conn_train, v_train = _trainable(lm), _trainable(conn), _trainable(vit)
    P, dv = vit.num_patches, vit.cfg.hidden_size
    # Inside 2·(...): params·tokens, plus 2·T²·d per attention layer (4·T²·d forward FLOPs).
    vision = 2 * images * (v_params * P + len(v_layers) * 2 * P * P * dv) * _passes(v_train, False)
    connector = 2 * images * _params(conn) * model.num_image_tokens * _passes(conn_train, v_train)
    lm_params = sum(_params(l) for l in lm.layers) + lm.lm_head.weight.numel()
    attn = len(lm.layers) * 2 * lm_context * lm.hidden_size  # 4·c·d per token and layer, inside 2·(...)
    language = 2 * (lm_tokens * lm_params + attn) * _passes(lm_train, conn_train or v_train)
    return float(vision + connector + language)


def dual_step_flops(model, pairs: int) -> float:
    """FLOPs for `pairs` image–text pairs through a dual encoder (texts at full padded length)."""
    vit = model.vision
    P, dv = vit.num_patches, vit.cfg.hidden_size
    head = _params(model.image_pool) + _params(model.image_proj)
    image = 2 * pairs * ((_params(vit.encoder) + _params(vit.embeddings.patch_embedding)) * P
                         + len(vit.encoder.layers) * 2 * P * P * dv + head) * _passes(_trainable(vit), False)
    if model.cfg.shared_tower:  # CLIPPO: the rendered text goes through the same tower
        return float(2 * image)
    tt, L, dt = model.text, model.text.cfg.max_len, model.text.cfg.hidden_size
    attn = len(tt.encoder.layers) * 2 * L * L * dt // (2 if tt.cfg.causal else 1)
    text = 2 * pairs * (_params(tt.encoder) * L + attn + _params(model.text_proj)) * _passes(_trainable(tt), False)
    return float(image + text)
