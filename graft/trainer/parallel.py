"""Parallelism, applied to an assembled model from outside it: none, DDP or FSDP2.

`apply(model, cfg, rt)` returns the engine the trainer calls for the forward and backward:
- none: the model itself (one process).
- ddp: `DistributedDataParallel(model)`: every process holds all weights; gradients are averaged.
- fsdp2: the model itself, sharded in place with `fully_shard` (torch.distributed.fsdp): each
  block (every element of an `nn.ModuleList`: the LM's decoder layers, the tower's encoder layers,
  the Q-Former's layers), then the root with the rest (embeddings, heads, norms, connector).
  Parameters, gradients and optimizer state are split over the processes; a block's weights are
  gathered just before its forward and backward. On GPUs with bf16 the block computes in bf16 and
  gradients are reduced in fp32 (MixedPrecisionPolicy); on CPUs everything stays fp32.

Options for any kind: activation checkpointing per block (recompute its activations in the
backward) and `torch.compile`: of the whole training forward (one process, DDP), or of each block
(FSDP2). The same recipe runs as one process or under torchrun;
the checkpoint format (trainer/checkpoint.py) is the same for all three, so a run may resume under
another kind or another number of processes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from graft.config import Config
from graft.errors import UserError


def kind(cfg: Config, rt) -> str:
    """The parallelism this run uses: `parallel.kind`, with auto = ddp under torchrun, else none."""
    k = cfg.parallel.kind
    if k == "auto":
        return "ddp" if rt.world_size > 1 else "none"
    if k == "ddp" and rt.world_size == 1:
        return "none"  # DDP over one process is the model itself
    if k == "none" and rt.world_size > 1:
        raise UserError(f"parallel.kind=none with {rt.world_size} processes: each would train its own copy; "
                        "use parallel.kind=ddp or fsdp2 (or auto)")
    return k


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units of every part: the elements of each nn.ModuleList, outermost lists first."""
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                if id(block) not in seen and not any(id(m) in seen for m in block.modules()):
                    found.append(block)
                    seen.update(id(m) for m in block.modules())
    return found


def apply(model: nn.Module, cfg: Config, rt) -> nn.Module:
    """Activation checkpointing and compilation per block, then the parallelism of `kind`."""
    units = blocks(model)
    if cfg.parallel.activation_checkpointing:
        if not units:
            raise UserError(f"parallel.activation_checkpointing: model={cfg.model} has no blocks to checkpoint")
        for block in units:
            _checkpoint_forward(block)
    k = kind(cfg, rt)
    if k == "fsdp2":
        if cfg.parallel.compile:  # per block: FSDP2's gathers and reduces run between them
            for block in units:
                block.compile(backend=cfg.parallel.compile_backend)
        shard(model, units, rt)
        return model
    # Buffers are not re-broadcast from rank 0 each forward: graft's are constants, or move alike on
    # every process (MoE balancing biases), or count what this process routed (MoE loads).
    engine = DDP(model, broadcast_buffers=False) if k == "ddp" else model
    if cfg.parallel.compile:
        # The whole training forward, glue and loss included (the VLM's is free of graph breaks
        # with this: its LM head runs only at the answer positions, a data-dependent count).
        # Evaluation keeps calling the eager model.
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        engine = torch.compile(engine, backend=cfg.parallel.compile_backend)
    return engine


def shard(model: nn.Module, units: list[nn.Module], rt) -> None:
    """FSDP2 over every process: each block, then the root with everything else."""
    # lazy: FSDP takes ~0.5 s to import
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    mp = MixedPrecisionPolicy()  # fp32 throughout
    if rt.dtype == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The rest (embeddings, tied LM head, norms, connector, pooling heads) is one unit with the
    # root: gathered for the whole forward, since a part may call another's module directly
    # (the VLM embeds tokens with the LM's table before the LM's forward).
    fully_shard(model, mesh=mesh, mp_policy=mp)


def is_sharded(model: nn.Module) -> bool:
    # lazy: FSDP takes ~0.5 s to import
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(engine: nn.Module, sync: bool):
    """A context for one micro-batch: without `sync`, gradients accumulate locally (DDP's no_sync,
    FSDP2's set_requires_gradient_sync), to be reduced with the last micro-batch's."""
    engine = getattr(engine, "_orig_mod", engine)  # under torch.compile's wrapper
    if isinstance(engine, DDP):
        return contextlib.nullcontext() if sync else engine.no_sync()
    if is_sharded(engine):
        engine.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every weight whole on every process (FSDP2: all-gathered once, kept through any number of
    forwards), so that each process can evaluate its share of the examples on its own. A no-op for
    an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    # lazy: FSDP takes ~0.5 s to import
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in units:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def grad_norm_value(norm: torch.Tensor) -> float:
    """The global gradient norm as a float (FSDP2 returns a replicated DTensor)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _checkpoint_forward(block: nn.Module) -> None:
    """Recompute `block`'s activations in the backward instead of keeping them (non-reentrant
    torch.utils.checkpoint); its parameter names do not change."""
    forward = block.forward

    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed
