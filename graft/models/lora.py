"""LoRA on the language model through `peft` (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

Each targeted linear W (d_out, d_in) becomes W x + (alpha / r) · B A x with A (r, d_in) random and
B (d_out, r) zero, so the model is unchanged at injection; W is frozen, A and B train. peft's
`inject_adapter_in_model` works on any `nn.Module` (graft's own decoder and HF models alike) and
renames a wrapped layer's weight `<name>.base_layer.weight` beside `<name>.lora_A.default.weight`.

`merge_lora` folds B A into W and puts the plain layer back, so a merged model has exactly the
parameter names of the model without LoRA (what export and `train.init_from` expect).
"""

from __future__ import annotations

from torch import nn

from graft.errors import UserError
from graft.models.decoder import LMConfig


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear

    return (nn.Linear, Conv1D)


def default_targets(lm: nn.Module) -> list[str]:
    """Every linear layer inside the decoder blocks (attention and MLP; not the LM head)."""
    blocks = lm.layers
    prefix = next(name for name, module in lm.named_modules() if module is blocks)
    return [f"{prefix}.{name}" for name, m in blocks.named_modules() if isinstance(m, _linear_types())]


def add_lora(lm: nn.Module, cfg: LMConfig) -> None:
    """Inject adapters into `lm` in place; afterwards only the adapters of `lm` require grad."""
    # lazy: peft takes ~2.5 s to import
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(cfg.lora_targets) or default_targets(lm)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, lm)
    except ValueError as e:  # peft names the targets it could not find
        raise UserError(f"lm.lora_targets={cfg.lora_targets}: {str(e).splitlines()[0][:160]}") from None


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter inside `module` into its base weight and unwrap it; returns how many."""
    # lazy: peft takes ~2.5 s to import
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(wrapped)
