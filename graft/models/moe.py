"""Sparse mixture-of-experts FFN for the built-in decoder (`lm.moe_experts` > 0).

A router (one linear map, D → E) scores every token for E SwiGLU experts; the token goes through
its `lm.moe_top_k` best, whose outputs are summed weighted by the router's softmax probabilities
renormalised over the chosen ones (Shazeer et al. 2017; GShard; Mixtral). Only chosen experts run
on a token, so the FLOPs measured for MFU and `graft compare` are the active ones.

Routing (`lm.moe_routing`): `agnostic` — any token may go to any expert; `aware` — image tokens
choose among the first half of the experts and text tokens among the second half (the
modality-aware MoE of Shukor et al. 2025, "Scaling laws for native multimodal models").

Balancing (`lm.moe_balance`): `loss` — the Switch Transformer's auxiliary loss (Fedus et al.
2022), E · Σ_e f_e · P_e with f_e the share of the routed slots expert e received and P_e its mean
router probability (1 when balanced, E when every token picks one expert), returned as the named
loss `moe_balance` summed over the MoE layers, weighed by `train.objectives` (e.g. 0.01);
`bias` — auxiliary-loss-free (DeepSeek-V3, Wang et al. 2024): a per-expert bias, added to the
scores only to choose experts, moves by `lm.moe_bias_rate` after every optimizer step toward the
experts that got fewer tokens than the mean during it (counts summed over the processes).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn

from graft.models.layers import AfterStep, SwiGLU
from graft.models.context import Context
from graft.models.lm_config import LMConfig
from graft.models.modality import TEXT

def is_moe_layer(cfg: LMConfig, index: int) -> bool:
    """Layers k-1, 2k-1, ... get experts (k = lm.moe_every): every layer for k = 1."""
    return cfg.moe_experts > 0 and index % cfg.moe_every == cfg.moe_every - 1


class MoE(nn.Module, AfterStep):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.top_k, self.routing, self.balance, self.rate = cfg.moe_top_k, cfg.moe_routing, cfg.moe_balance, cfg.moe_bias_rate
        hidden = cfg.moe_intermediate_size or cfg.intermediate_size
        self.router = nn.Linear(cfg.hidden_size, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, hidden, cfg.hidden_size) for _ in range(cfg.moe_experts))
        self.register_buffer("bias", torch.zeros(cfg.moe_experts))  # moe_balance=bias: choice only
        self.register_buffer("load", torch.zeros(cfg.moe_experts), persistent=False)  # slots since the last step
        self.register_buffer("seen", torch.zeros(cfg.moe_experts), persistent=False)  # slots since the last log line

    def route(self, x: torch.Tensor, modality_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """For tokens x (N, D): the chosen experts (N, k), their weights (N, k) and the router's
        probabilities (N, E)."""
        logits = self.router(x).float()  # (N, E)
        if self.routing == "aware" and modality_ids is not None:
            image = (modality_ids.reshape(-1) != TEXT)[:, None]  # an image's or a series' tokens
            first = torch.arange(logits.shape[1], device=x.device) < logits.shape[1] // 2  # the non-text tokens' experts
            logits = logits.masked_fill(image != first, float("-inf"))
        probs = logits.softmax(-1)
        chosen = (probs + self.bias if self.balance == "bias" else probs).topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        return chosen, (weights / weights.sum(-1, keepdim=True)).to(x.dtype), probs

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # (N, D)
        chosen, weights, probs = self.route(x, ctx.modality_ids)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, weights[rows, slot, None] * expert(x[rows]))
        load = torch.bincount(chosen.reshape(-1), minlength=len(self.experts)).float()  # slots per expert
        if self.training:
            self.seen += load.detach()
        if self.balance == "loss":
            share = load / load.sum()
            balance = len(self.experts) * (share * probs.mean(0)).sum() * x.shape[0]  # a local sum over tokens
            ctx.aux["moe_balance"] = ctx.aux.get("moe_balance", 0) + balance
        elif self.balance == "bias" and self.training:
            self.load += load.detach()
        return out.reshape(shape)

    @torch.no_grad()
    def after_step(self) -> None:
        """After an optimizer step (the trainer calls it on every process): the bias moves toward
        the experts that got fewer slots than the mean since the last step, over all processes."""
        if self.balance != "bias":
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.load)  # every process moves its bias alike
        self.bias += self.rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


@torch.no_grad()
def expert_loads(model: nn.Module) -> dict:
    """The share of routed slots each expert of each MoE layer took since the last call, over all
    processes (every process calls it): `moe/load/<layer>` lists them (they sum to 1), `moe/max_load`
    is the largest share x the number of experts over all layers (1 = balanced, E = one expert took
    everything). Empty for a model without MoE layers; the counts restart after each call."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        return {}
    seen = torch.stack([m.seen for _, m in layers])  # (layers, E)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seen)
    for _, m in layers:
        m.seen.zero_()
    share = seen / seen.sum(1, keepdim=True).clamp(min=1)
    out = {f"moe/load/{_layer(name)}": [round(x, 4) for x in row] for (name, _), row in zip(layers, share.tolist())}
    return out | {"moe/max_load": float(share.max() * share.shape[1])}


def _layer(name: str) -> str:
    """`lm.layers.3.mlp` → `3`: the LM layer a module sits in."""
    parts = name.split(".")
    return next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layers"), name)
