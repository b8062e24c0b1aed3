"""One training step of graft's VLM vs the same model as `transformers.LlavaForConditionalGeneration`.

Both models hold the same weights (graft's exported with `graft.models.hf_llava.to_llava`), see
the same batches from the built-in world, and take a forward + backward + AdamW step; they are
timed alternately in one process so that machine noise hits both. A third row is graft as
`graft train` runs it on the same conversations: packed into rows, the LM head only where an
answer token is predicted, its optimizer (`optim.*`) and `parallel.apply` (`parallel.compile`). Prints ms/step, samples/s and
the ratio (graft speed / HF speed; > 1 means graft is faster), plus the first-step losses (they
must agree: same function).

    python benchmarks/hf_llava_step.py                                   # CPU, fp32, shapes_vqa model
    python benchmarks/hf_llava_step.py --device cuda --precision bf16    # GPU, bf16 autocast
    python benchmarks/hf_llava_step.py --set parallel.compile=true --warmup 6   # graft's path compiled
    python benchmarks/hf_llava_step.py --set lm.hidden_size=512 --set lm.layers=8 --set lm.intermediate_size=1536
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time

import torch

from graft.config_checks import apply_overrides
from graft.build import build_stream
from graft.data.world_source import make_world
from graft.data.tokenizer import ChatTokenizer, world_corpus
from graft.losses import batch_loss
from graft.models.hf_llava import to_llava
from graft.recipes import RECIPES
from graft.build import build_model, build_processor
from graft.trainer import parallel
from graft.trainer.optim import build_optimizer, param_groups
from graft.trainer.runtime import Runtime, keep_freed_memory


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="shapes_vqa")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()


def build(args):
    cfg = apply_overrides(RECIPES[args.recipe](), args.set)
    torch.manual_seed(0)
    tok = ChatTokenizer.train(world_corpus(make_world(cfg)), cfg.data.vocab_size)
    model = build_model(cfg, tok)
    hf = to_llava(model, cfg, tok)
    hf.config._attn_implementation = "sdpa"  # HF's default fast path, as a user would run it
    hf.train()
    proc = build_processor(cfg, tok, model)
    cfg.train.batch_size, cfg.train.grad_accum = args.batch_size, 1
    # Like for like: both models get the same right-padded batches. graft's default path (below)
    # packs the same conversations into rows (data/packing.py), which HF's LLaVA forward cannot take.
    packed = copy.deepcopy(cfg)
    cfg.data.pack = False
    packed.data.pack = True
    rt = Runtime(torch.device("cpu"), torch.float32)
    return cfg, model, hf, build_stream(cfg, proc, rt), build_stream(packed, proc, rt)


def to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def graft_loss(model, batch):
    return batch_loss(model, batch)


def hf_loss(model, batch):
    return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss


def make_step(model, loss_fn, device, precision, optimizer=None):
    """A timed step; torch's default AdamW unless `optimizer` (graft's own, from its config)."""
    opt = optimizer or torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, loss.item()

    return step


def main() -> None:
    args = parse()
    if args.device == "cpu" and not os.environ.get("NOKEEP"):
        keep_freed_memory()  # as `graft train` does on a CPU; one process, so all three models get it
    cfg, graft_model, hf_model, stream, packed_stream = build(args)
    graft_model.to(args.device).train()
    hf_model.to(args.device)
    # graft as `graft train` runs it: the same conversations packed into rows, the LM head and loss
    # only at the positions that predict an answer token (VLM.supervised_logits), its optimizer and
    # its parallel.apply (one process: torch.compile of the training forward if parallel.compile)
    default_model = copy.deepcopy(graft_model)
    default_model.supervised_logits = True
    rt = Runtime(torch.device(args.device), torch.bfloat16 if args.precision == "bf16" else torch.float32)
    default_engine = parallel.apply(default_model, cfg, rt)
    n = args.warmup + args.steps
    batches = {"graft (padded, like for like)": [to(stream.batch(s, 0), args.device) for s in range(n)],
               "transformers": [to(stream.batch(s, 0), args.device) for s in range(n)],
               "graft (its default: packed, head at answers)": [to(packed_stream.batch(s, 0), args.device) for s in range(n)]}
    steps = {"graft (padded, like for like)": make_step(graft_model, graft_loss, args.device, args.precision),
             "transformers": make_step(hf_model, hf_loss, args.device, args.precision),
             "graft (its default: packed, head at answers)": make_step(
                 default_engine, graft_loss, args.device, args.precision, build_optimizer(default_model, cfg.optim))}
    times = {k: [] for k in steps}
    first_loss = {}
    for i in range(n):  # alternate, so all see the same machine state
        for name, step in (steps.items() if i % 2 == 0 else reversed(steps.items())):
            seconds, loss = step(batches[name][i])
            first_loss.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(seconds)
    n_params = sum(p.numel() for p in graft_model.parameters())
    print(f"model: {args.recipe} {' '.join(args.set)}  ({n_params / 1e6:.2f} M params), batch {args.batch_size}, "
          f"{args.device} {args.precision}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("first-step loss: " + "  ".join(f"{k} {v:.5f}" for k, v in first_loss.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| implementation | ms/step (median) | samples/s |")
    print("|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {1000 * m:.1f} | {args.batch_size / m:.0f} |")
    for name, m in med.items():
        if name != "transformers":
            print(f"speed ratio {name} / transformers: {med['transformers'] / m:.2f}x")
    print("command: " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]))


if __name__ == "__main__":
    main()
