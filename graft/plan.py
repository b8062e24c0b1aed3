"""`graft train RECIPE --dry-run`: the parameter count and the memory per GPU of a run, computed
before any weight exists.

The config is resolved and validated as training does it, and the model is assembled on the `meta`
device (shapes only: no memory, no weights, no download), so the parameter counts are those of the
real model, `train.freeze` and LoRA included. Nothing is written. The memory of one process is then
computed from those counts and the config; all figures are bytes.

**Weights, gradients, optimizer.** N processes; P parameters, P_t of them trainable. FSDP2 shards
every block (the elements of each `nn.ModuleList`), then the root with every other weight
(graft/trainer/parallel.py); B is the largest block, R the root's unit (embeddings, LM head, norms,
connector), B_t and R_t their trainable parameters; c = 2 under bf16 mixed precision, else 4.

                  none / ddp (a whole copy per process)       fsdp2
    parameters    4P  (+ 2·P_mm: autocast's bf16 copies)       4P/N + c(R + 2B): fp32 shards, plus
                                                               the gathered unit and two blocks
                                                               (the one running, the one prefetched)
    gradients     4P_t (ddp: 8P_t, its all-reduce buckets      4P_t/N + g·max(R_t, B_t): a unit's
                  are a second copy)                           whole gradient (g = 6 in bf16 with
                                                               its fp32 copy for the reduce, else 4)
    optimizer     8P_t: AdamW's two fp32 moments               8P_t/N

P_mm: the weights of matmul layers (nn.Linear, nn.Conv*), whose bf16 casts autocast caches during
the forward and autograd keeps for the backward (an upper bound: frozen ones are cast per use).
AdamW's foreach step briefly allocates another 4P_t/N, after the activations are freed: not counted.

**Activations** of one micro-batch: b rows of T = lm.max_seq_len tokens (image tokens + text; every
row full, an upper bound) with n images of p patches, counted as the tensors autograd saves for the
backward (tests/test_cluster.py measures them with `saved_tensors_hooks` on CPU: equal to within
0.03 %). Under bf16, FSDP2 computes with bf16 weights (MixedPrecisionPolicy), DDP and one process
with bf16 autocast over fp32 weights. Per token, with d, f, h the width, MLP width and heads of the
block; a the bytes of an activation (4 fp32, 2 bf16) and r those of the residual stream between
blocks (4 fp32; 2 with bf16 weights; 4 under autocast, whose additions stay fp32); k = 3, m = 2
under autocast (each matmul casts its input, a copy each), else k = m = 1:

    decoder block   4(2d + 2 + h) + 2d·r + a(k·d + 2d + 2e + m·d + 4f)   [+ a·T with an attention mask]
                    RMSNorm's fp32 inputs and 1/rms, attention's fp32 log-sum-exp; both normalised
                    inputs; the inputs of q/k/v, q, k and v (e = the kv heads' width; e = d on GPUs
                    with a mask, where k/v are repeated for every query head), attention's
                    output, the MLP's input, gate, SiLU, up and their product. A mask (packed rows,
                    bidirectional images) is made additive in each layer. LoRA: a·rank per adapter.
    ViT block       4(4 + h) + 2d·r + a(k·d + 5d + 2f)
                    LayerNorm's statistics and the log-sum-exp; its inputs; the inputs of q/k/v,
                    q/k/v, attention's output, the MLP's input, fc1's output and GELU's.

Outside the blocks: the pixels a·3·S² per image; the connector a(d_v + 2d) per image token (mlp;
a·d_v linear; other kinds are not counted); per token, the ids and image-slot mask 9, the RoPE
tables 2(d/h)·r, the final norm 4(d + 1) + (r + a)d, the boolean attention mask T (when there is
one); the loss's fp32 log-probabilities 4(T - 1)V per row. Beside what is saved, the logits a·TV per
row are held by the trainer, and one fp32 TV buffer per row holds the loss's gradient (an upper
bound: the trainer computes the head and loss of a VLM only at positions that predict an answer
token, `VLM.forward` in training, a data-dependent share — 13 % of the demo's). A frozen
tower saves nothing (nothing before it needs a gradient); a frozen LM is counted whole (an upper
bound). With activation checkpointing (per block) a block keeps only its input, d·r per token, and
the largest block's activations exist once more while it is recomputed in the backward.

The total adds the four; gradients and activations both peak in the backward, so it is an upper
bound of the peak. CUDA's context, NCCL's buffers and the allocator's slack (~1-3 GiB) are not
counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from graft.build import assemble, resolve, tokenizer_for
from graft.config import Config
from graft.data.sources import source_kind
from graft.designs import design, uses_packing
from graft.designs.shared import TOWER_SECTIONS
from graft.errors import UserError
from graft.models.connectors import CONNECTORS
from graft.models.decoder import gqa_in_kernel
from graft.rundir import RunDir
from graft.trainer.parallel import blocks
from graft.trainer.parallel import kind as parallel_kind

GIB = 1 << 30


@dataclass(frozen=True)
class Precision:
    """Bytes per element: `act` of matmul inputs and outputs, `stream` of the residual stream."""

    name: str
    act: int
    stream: int

    @property
    def casts(self) -> bool:
        """Autocast: each matmul casts its (fp32) input to bf16, a copy per consumer."""
        return self.act != self.stream


FP32 = Precision("fp32", 4, 4)
BF16 = Precision("bf16 (FSDP2 mixed precision: bf16 compute, fp32 master weights and reductions)", 2, 2)
AUTOCAST = Precision("bf16 autocast (fp32 weights, matmuls in bf16)", 2, 4)


def decoder_block(d: int, f: int, h: int, p: Precision, mask_len: int = 0, lora: int = 0, kv: int | None = None) -> int:
    """Bytes the built-in decoder block (= HF Llama's) saves per token (module docstring); `kv`:
    the width of the saved keys and values (d when they are repeated for every query head)."""
    k, m = (3, 2) if p.casts else (1, 1)
    saved = k * d + 2 * d + 2 * (d if kv is None else kv) + m * d + 4 * f + mask_len + lora
    return 4 * (2 * d + 2 + h) + 2 * d * p.stream + p.act * saved


def vit_block(d: int, f: int, h: int, p: Precision) -> int:
    """Bytes the ViT block (= HF SigLIP's; the text tower's too) saves per token."""
    k = 3 if p.casts else 1
    return 4 * (4 + h) + 2 * d * p.stream + p.act * (k * d + 5 * d + 2 * f)


@dataclass
class Shape:
    """What one micro-batch holds: `rows` of `seq` tokens, `images` of `patches` patches."""

    rows: int
    seq: int
    images: int
    patches: int
    image_tokens: int = 0  # per image, in the LM's input


def activations(cfg: Config, shape: Shape, p: Precision, trains: dict[str, bool],
                checkpointing: bool = False, device: str = "cpu") -> tuple[dict[str, int], list[str]]:
    """Bytes by term (module docstring) for the sections the design reads, and notes on what is
    not counted. `trains[part]`: whether that part has trainable weights."""
    modality = source_kind(cfg).modality.name  # the other modalities' tower sections are not read
    sections = [s for s in design(cfg.model).sections
                if s not in {sec for name, (sec, _) in TOWER_SECTIONS.items() if name != modality}]
    terms, notes, blocks = {}, [], [0]
    tower = getattr(cfg, TOWER_SECTIONS[modality][0]) if modality in TOWER_SECTIONS else cfg.vision
    if "vision" in sections and trains.get("vision"):
        v = cfg.vision
        run = v.layers if v.hf_path or "connector" not in sections else v.feature_layer % v.layers + 1
        shared = cfg.contrastive.shared_tower and "text" in sections  # CLIPPO: rendered texts go through it too
        images = shape.images * (2 if shared else 1)
        per_token = vit_block(v.hidden_size, v.intermediate_size, v.heads, p)
        blocks.append(images * shape.patches * per_token)
        kept = v.hidden_size * p.stream if checkpointing else per_token
        terms["vision"] = images * (shape.patches * run * kept + p.act * 3 * v.image_size**2)
    if "text" in sections and trains.get("text") and not cfg.contrastive.shared_tower:
        t = cfg.text
        per_token = vit_block(t.hidden_size, t.intermediate_size, t.heads, p)
        blocks.append(shape.rows * t.max_len * per_token)
        kept = t.hidden_size * p.stream if checkpointing else per_token
        terms["text"] = shape.rows * t.max_len * (t.layers * kept + 8)
    if "connector" in sections and (trains.get("connector") or trains.get("vision")):
        width = getattr(CONNECTORS[cfg.connector.kind], "activation_width", None)
        if width is not None:
            terms["connector"] = shape.images * shape.image_tokens * p.act * width(tower.hidden_size,
                                                                                  cfg.lm.hidden_size)
        else:
            notes.append(f"the {cfg.connector.kind} connector's activations are not counted")
    if "lm" in sections:
        lm_terms, block = _lm(cfg, shape, p, checkpointing, device)
        terms |= lm_terms
        blocks.append(block)
    for section in sections:  # distill: frozen teachers save nothing for backward; the student's heads are small
        if section not in ("vision", "text", "connector", "lm", "contrastive", "distill"):
            notes.append(f"the {section} section's activations are not counted")
    if checkpointing:
        terms["recompute"] = max(blocks)
    return terms, notes


def _lm(cfg: Config, shape: Shape, p: Precision, checkpointing: bool, device: str) -> tuple[dict[str, int], int]:
    """The decoder's terms, and the bytes of its largest block (recomputed under checkpointing)."""
    lm, tokens = cfg.lm, shape.rows * shape.seq
    masked = not lm.hf_path and (uses_packing(cfg) or lm.image_attention == "bidirectional")
    lora = lm.lora_rank * (len(lm.lora_targets) or 7)  # default: a block's 7 linears (q k v o gate up down)
    d, hd = lm.hidden_size, lm.hidden_size // lm.heads
    kv = hd * lm.kv_heads if gqa_in_kernel(torch.device(device), masked) else d
    per_token = decoder_block(d, lm.intermediate_size, lm.heads, p, shape.seq if masked else 0, lora, kv)
    kept = d * p.stream if checkpointing else per_token
    # ids (int64) and image-slot mask; RoPE tables; the final norm; the boolean attention mask
    outside = 9 + 2 * hd * p.stream + 4 * (d + 1) + (p.stream + p.act) * d + (shape.seq if masked else 0)
    return {
        "lm": tokens * (lm.layers * kept + outside),
        "loss": shape.rows * ((shape.seq - 1) * (4 * lm.vocab_size + 8)),
        "logits": tokens * lm.vocab_size * (p.act + 4),  # held by the trainer + the loss's fp32 gradient
    }, tokens * per_token


# ---- the weights' side: counts, shard units, bytes -------------------------------------------------


def counts(model: nn.Module, parts: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(parameters, trainable) of the whole model ("total") and of each part, tied weights once."""
    def tally(params) -> tuple[int, int]:
        unique = {id(q): q for q in params}.values()
        return sum(q.numel() for q in unique), sum(q.numel() for q in unique if q.requires_grad)

    out = {"total": tally(model.parameters())}
    for part in parts:
        out[part] = tally(q for name in model.part_modules(part) for q in model.get_submodule(name).parameters())
    return out


def units(model: nn.Module) -> tuple[list[nn.Module], list[list[nn.Parameter]]]:
    """FSDP2's units as trainer/parallel.py makes them: the blocks, and the root with every other weight."""
    found = blocks(model)
    in_blocks = {id(q) for b in found for q in b.parameters()}
    rest = [q for q in {id(q): q for q in model.parameters()}.values() if id(q) not in in_blocks]
    return found, [rest]


def state_bytes(model: nn.Module, kind: str, p: Precision, world: int) -> dict[str, int]:
    """Parameters, gradients and optimizer state of one process (module docstring)."""
    params = {id(q): q for q in model.parameters()}.values()
    total = sum(q.numel() for q in params)
    trainable = sum(q.numel() for q in params if q.requires_grad)
    if kind != "fsdp2":
        matmul = {id(q): q for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                  for q in m.parameters()}
        casts = 2 * sum(q.numel() for q in matmul.values()) if p.casts else 0
        return {"parameters": 4 * total + casts,
                "gradients": 4 * trainable * (2 if kind == "ddp" else 1),
                "optimizer": 8 * trainable}
    found, rest = units(model)
    c = p.act  # the gathered units' dtype: bf16 under mixed precision
    block = max((sum(q.numel() for q in b.parameters()) for b in found), default=0)
    other = max(sum(q.numel() for q in r) for r in rest)
    live = max([sum(q.numel() for q in b.parameters() if q.requires_grad) for b in found]
               + [sum(q.numel() for q in r if q.requires_grad) for r in rest])
    return {"parameters": 4 * total // world + c * (other + 2 * block),
            "gradients": 4 * trainable // world + (c + 4 if c == 2 else 4) * live,
            "optimizer": 8 * trainable // world}


# ---- the dry run -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What `graft train --dry-run` prints: the run's settings, counts and memory per process."""

    recipe: str
    world: int
    world_from: str  # where the world size came from
    device: str
    kind: str  # the parallelism trainer/parallel.py applies
    precision: Precision
    checkpointing: bool
    batch: int
    accum: int
    shape: Shape
    counts: dict[str, tuple[int, int]]  # "total" and each part: (parameters, trainable)
    memory: dict[str, int]  # parameters, gradients, optimizer, activations
    terms: dict[str, int]  # the activations by term
    notes: list[str] = field(default_factory=list)
    resumes: str | None = None

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    def render(self) -> str:
        s, (total, trainable) = self.shape, self.counts["total"]
        parts = ", ".join(f"{name} {_count(n)}{'' if t else ' frozen'}"
                          for name, (n, t) in self.counts.items() if name != "total" and n)
        micro, unit = self.batch // self.accum, ("GiB", GIB) if self.total >= GIB else ("MiB", 1 << 20)
        lines = [
            f"graft train {self.recipe} --dry-run: nothing written, no weights made (model built on the meta device)",
            f"parameters      {total:,} total, {trainable:,} trainable ({parts})",
            f"world size      {self.world} ({self.world_from}), device {self.device}, parallel.kind={self.kind}",
            f"precision       {self.precision.name}",
            (f"batch           {self.batch} per process = {self.accum} micro-batch(es) of {micro} "
             f"(train.grad_accum); global batch {self.batch * self.world}"),
        ]
        if s.seq:
            lines.append(f"sequence        rows of up to {s.seq:,} tokens (lm.max_seq_len), "
                         f"{s.images // s.rows} image(s) of {s.image_tokens} tokens each + text")
        lines.append(f"checkpointing   {'on' if self.checkpointing else 'off'} (parallel.activation_checkpointing)")
        if self.resumes:
            lines.append(f"resumes         {self.resumes}")
        lines.append(f"memory per process, {unit[0]} (an estimate; the formula is in graft/plan.py):")
        for key, value in self.memory.items():
            lines.append(f"  {key:<13s}{value / unit[1]:9.2f}   {self._what(key, unit[1])}")
        slack = "   + CUDA context, NCCL and allocator slack (~1-3 GiB)" if self.device == "cuda" else ""
        lines.append(f"  {'total':<13s}{self.total / unit[1]:9.2f}{slack}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _what(self, key: str, div: int) -> str:
        sharded = self.kind == "fsdp2"
        if key == "parameters" and sharded:
            return f"fp32 shard + the {'bf16' if self.precision.act == 2 else 'fp32'} units gathered in turn"
        if key == "parameters":
            return "fp32" + (" + autocast's bf16 copies" if self.precision.casts else "")
        if key == "gradients":
            return {"fsdp2": "fp32 shard + a unit's whole gradient while it is reduced",
                    "ddp": "fp32 + DDP's all-reduce buckets"}.get(self.kind, "fp32")
        if key == "optimizer":
            return "AdamW: 2 fp32 moments per trainable weight" + (" (shard)" if sharded else "")
        terms = ", ".join(f"{k} {v / div:.2f}" for k, v in self.terms.items() if v)
        return f"micro-batch of {self.shape.rows}: {terms}"


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n / 1e3:,.1f} k"


def dry_run(cfg: Config, recipe: str, out: str | None = None, gpus: int | None = None) -> Plan:
    """The plan of `graft train RECIPE` on `gpus` processes (else WORLD_SIZE, else 1)."""
    world, world_from = _world(gpus)
    device = _device(cfg, gpus)
    run = RunDir(out) if out else None
    if run is not None and run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {run.path} exists and is not a directory")
    tok = tokenizer_for(cfg, run)  # the run's own when resuming: its vocabulary sizes the model
    cfg, changes = resolve(cfg, tok)
    with torch.device("meta"):
        model = assemble(cfg, tok, init=False)  # no weights: HF folders give their architecture only
    kind = parallel_kind(cfg, SimpleNamespace(world_size=world))
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device == "cuda")
    p = (BF16 if kind == "fsdp2" else AUTOCAST) if bf16 else FP32
    entry = design(cfg.model)
    number = counts(model, entry.parts)
    trains = {part: number[part][1] > 0 for part in entry.parts}
    shape = _shape(cfg, model, cfg.train.batch_size // cfg.train.grad_accum)
    terms, notes = activations(cfg, shape, p, trains, cfg.parallel.activation_checkpointing, device)
    if changes:
        notes.insert(0, f"vision.init_from: takes {', '.join(changes)} from {cfg.vision.init_from}")
    memory = state_bytes(model, kind, p, world) | {"activations": sum(terms.values())}
    ckpt = run.latest_checkpoint() if run is not None and run.path.is_dir() else None
    return Plan(recipe, world, world_from, device, kind, p, cfg.parallel.activation_checkpointing,
                cfg.train.batch_size, cfg.train.grad_accum, shape, number, memory, terms, notes,
                resumes=f"{ckpt} (the same command resumes from it)" if ckpt else None)


def _shape(cfg: Config, model: nn.Module, rows: int) -> Shape:
    """The largest micro-batch: rows full to lm.max_seq_len; on the built-in world one image per
    conversation (`data.images_per_doc` per document), else as many as fit (≤ data.max_images)."""
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    if "lm" not in design(cfg.model).sections:
        return Shape(rows, 0, rows, patches)
    n = model.num_image_tokens
    fit = cfg.lm.max_seq_len // max(n, 1)
    most = source_kind(cfg).max_images(cfg.data)
    per_row = 0 if cfg.data.text_only else max(1, min(most, fit))
    return Shape(rows, cfg.lm.max_seq_len, rows * per_row, patches, n)


def _world(gpus: int | None) -> tuple[int, str]:
    if gpus is not None:
        if gpus < 1:
            raise UserError(f"--gpus={gpus} must be at least 1")
        return gpus, "--gpus"
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 1, "one process: no --gpus, no WORLD_SIZE"
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"WORLD_SIZE={raw!r} is not a positive integer")
    return int(raw), "WORLD_SIZE"


def _device(cfg: Config, gpus: int | None) -> str:
    if gpus is not None:
        if cfg.train.device == "cpu":
            raise UserError("--gpus plans a run on GPUs, but train.device=cpu")
        return "cuda"
    if cfg.train.device != "auto":
        return cfg.train.device
    return "cuda" if torch.cuda.is_available() else "cpu"

