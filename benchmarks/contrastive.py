"""Dual-encoder benchmark: graft vs Hugging Face `transformers`, and the loss's peak memory.

1. Throughput. The same dual-encoder sizes are trained side by side in one process, in graft and
   in the HF reference a user would otherwise pick: graft `siglip` vs `SiglipModel`, graft `clip`
   vs `CLIPModel` (equal widths, depths, heads, MLP sizes, patch and text length; AdamW, fp32,
   the same Shapes batch). Steps alternate between the two so machine noise hits both alike.
   Remaining architectural differences: CLIPModel pools images with a class token (graft: attention
   pooling) and uses quick-GELU; graft adds an image projection that SiglipModel lacks.
2. Loss memory. Peak memory of clip_loss / siglip_loss forward + backward at batch 4,096
   (D = 256), without and with chunking, measured with torch's MemTracker.

    python benchmarks/contrastive.py [--steps 20] [--batch 128] [--loss-batch 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from graft.data.shapes import ShapesWorld
from graft.data.tokenizer import ChatTokenizer, world_corpus
from graft.losses import batch_loss, clip_loss, siglip_loss
from graft.recipes import clip, siglip
from graft.build import build_stream
from graft.trainer.runtime import Runtime
from graft.build import build_model, build_processor


def hf_twin(cfg, vocab: int, eos: int):
    """SiglipModel or CLIPModel with graft's sizes."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    v, t = cfg.vision, cfg.text
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size)
    text = dict(vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_len,
                eos_token_id=eos)
    if cfg.contrastive.loss == "siglip":
        text["projection_size"] = cfg.contrastive.embed_dim
        return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.contrastive.embed_dim))


def throughput(recipe, tok, steps: int, batch: int) -> dict:
    cfg = recipe()
    cfg.train.batch_size = batch
    ours = build_model(cfg, tok)
    theirs = hf_twin(cfg, len(tok), tok.eos)
    rt = Runtime(torch.device("cpu"), torch.float32)
    data = build_stream(cfg, build_processor(cfg, tok, ours), rt).batch(0, 0)
    runs = {
        "graft": (ours, lambda: batch_loss(ours, data)),
        "hf": (theirs, lambda: theirs(input_ids=data["input_ids"], pixel_values=data["pixel_values"], return_loss=True).loss),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in runs.items()}
    spent = {k: 0.0 for k in runs}
    for step in range(steps + 3):  # 3 warm-up steps, then alternate the timed ones
        for name, (model, loss_fn) in runs.items():
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            loss_fn().backward()
            opts[name].step()
            if step >= 3:
                spent[name] += time.perf_counter() - t0
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in runs.items()}
    sps = {k: steps * batch / spent[k] for k in runs}
    return {"graft_sps": sps["graft"], "hf_sps": sps["hf"], "ratio": sps["graft"] / sps["hf"],
            "graft_params": params["graft"], "hf_params": params["hf"]}


def loss_peak_mib(loss: str, n: int, d: int, chunk: int) -> float:
    from torch.distributed._tools.mem_tracker import MemTracker

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    tracker = MemTracker()
    tracker.track_external(x, y, scale, bias)
    with tracker:
        value = clip_loss(x, y, scale, chunk_size=chunk) if loss == "clip" else siglip_loss(x, y, scale, bias, chunk_size=chunk)
        value.backward()
    peak = tracker.get_tracker_snapshot("peak")
    return sum(v["Total"] for v in peak.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--loss-batch", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=512)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    print(f"command: python benchmarks/contrastive.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    tok = ChatTokenizer.train(world_corpus(ShapesWorld(24, 3, 4)), 384)
    print(f"\n| model (batch {args.batch}, {args.steps} timed steps) | graft samples/s | HF samples/s | graft / HF | params graft / HF |")
    print("|---|---|---|---|---|")
    for recipe, ref in ((siglip, "SiglipModel"), (clip, "CLIPModel")):
        r = throughput(recipe, tok, args.steps, args.batch)
        print(f"| {recipe.__name__} vs {ref} | {r['graft_sps']:.1f} | {r['hf_sps']:.1f} | {r['ratio']:.2f} | "
              f"{r['graft_params'] / 1e6:.2f} M / {r['hf_params'] / 1e6:.2f} M |", flush=True)
    n, d = args.loss_batch, 256
    print(f"\n| loss at batch {n}, D={d}, fwd+bwd, one process | peak MiB, full logits | peak MiB, chunk {args.chunk} |")
    print("|---|---|---|")
    for loss in ("clip", "siglip"):
        full, chunked = loss_peak_mib(loss, n, d, 0), loss_peak_mib(loss, n, d, args.chunk)
        print(f"| {loss}_loss | {full:.1f} | {chunked:.1f} |", flush=True)
    print("\nOn W processes the local loss holds a (N/W) x N block per rank: about 1/W of the full-logit figure.")


if __name__ == "__main__":
    main()
