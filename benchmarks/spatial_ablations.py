"""Ablations behind docs/spatial.md: why spatial-relation questions stay at chance in `shapes_vqa`.

Each flag changes one thing the recipe has no config key for, by patching the trainer from
outside (nothing here is part of graft), then trains `shapes_vqa` (800 steps unless --set says
otherwise) and prints the VQA accuracy per question type on the test split.

    python benchmarks/spatial_ablations.py --out DIR [flags] [--set key=value ...]

--mix where          + two "where is the red circle?" -> "top left" questions per image
--mix where-only     only the "where" questions (no other turns)
--mix colrow         + one "which column/row is the red circle in?" -> "2" per image
--mix spatialN       + N more spatial questions per image (e.g. spatial2)
--vit-pos std:S      ViT position table initialised N(0, S^2) (graft: 0.02, as HF SigLIP)
--vit-pos sincos:R   ViT position table set to a 2-D sin-cos table of rms R
--lm-pos sincos:R    a fixed 2-D sin-cos table of rms R added to the connector's output (LM space)
--bidir              image tokens attend to each other both ways in the LM (prefix-LM mask)
--mrope              2-D rotary positions for image tokens (M-RoPE, Qwen2-VL, with the rotary
                     frequencies interleaved over the time / row / column axes); text keeps 1-D
--oracle             no ViT: each image token is a sum of learned embeddings of its cell's
                     colour, shape, size, row and column (perfect, symbolic vision)
"""

from __future__ import annotations

import argparse
import json
import math
import random

import torch
from torch import nn

import graft.data.processor as processor
import graft.data.shapes as shapes
import graft.data.stream as stream
import graft.models.decoder as decoder
import graft.models.vlm as vlm
import graft.train.loop as loop
from graft.config import apply_overrides
from graft.data.shapes import COLORS, SHAPES, SIZES, _question, _unique
from graft.recipes import RECIPES


def sincos_2d(grid: int, dim: int, rms: float) -> torch.Tensor:
    """(grid*grid, dim): sin/cos of row and column at dim/4 frequencies each, scaled to `rms`."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    parts = []
    for p in (ys.flatten(), xs.flatten()):
        a = p[:, None].float() * omega[None]
        parts += [a.sin(), a.cos()]
    t = torch.cat(parts, 1)
    return t / t.pow(2).mean().sqrt() * rms


def where(o) -> str:
    return ("top", "middle", "bottom")[o.row] + " " + ("left", "center", "right")[o.col]


def patch_mix(mix: str) -> None:
    default_turns = stream.training_turns

    def turns(sample, rng, questions, caption_prob):
        out = [] if mix == "where-only" else default_turns(sample, rng, questions, caption_prob)
        named = _unique(sample.objects, lambda o: o.name)
        if mix.startswith("where"):
            out += [(f"where is the {o.name}?", where(o)) for o in rng.sample(named, min(2, len(named)))]
        elif mix == "colrow" and named:
            o = rng.choice(named)
            axis, value = ("column", o.col) if rng.random() < 0.5 else ("row", o.row)
            out.append((f"which {axis} is the {o.name} in?", str(value + 1)))
        elif mix.startswith("spatial") and len(named) >= 2:
            out += [(q.question, q.answer) for q in (_question("spatial", sample.objects, rng, None)
                                                    for _ in range(int(mix[len("spatial"):])))]
        rng.shuffle(out)
        return out or [(sample.qa[0].question, sample.qa[0].answer)]

    stream.training_turns = turns


class Oracle(nn.Module):
    """Symbolic vision: the processor writes each cell's (colour, shape, size) ids into pixels."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid, self.embed_dim, self.num_patches = grid, dim, grid * grid
        self.color, self.shape = nn.Embedding(len(COLORS) + 1, dim), nn.Embedding(len(SHAPES) + 1, dim)
        self.size, self.row, self.col = nn.Embedding(len(SIZES) + 1, dim), nn.Embedding(grid, dim), nn.Embedding(grid, dim)
        self.post_layernorm = nn.LayerNorm(dim)  # unused; the VLM expects one

    def features(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        ids = x[:, :, :g, :g].long().flatten(2)  # (B, 3, g*g)
        rows, cols = torch.arange(g).repeat_interleave(g), torch.arange(g).repeat(g)
        return self.color(ids[:, 0]) + self.shape(ids[:, 1]) + self.size(ids[:, 2]) + self.row(rows) + self.col(cols)


def patch_oracle() -> None:
    world_sample = shapes.ShapesWorld.sample

    def sample(self, split, index):
        s = world_sample(self, split, index)
        s.image.info["objects"] = s.objects  # travels with the image into Processor.pixels
        return s

    def pixels(self, img):
        x = torch.zeros(3, self.image_size, self.image_size)
        for o in img.info["objects"]:
            x[:, o.row, o.col] = torch.tensor([list(COLORS).index(o.color), SHAPES.index(o.shape), SIZES.index(o.size)]) + 1.0
        return x

    shapes.ShapesWorld.sample, processor.Processor.pixels = sample, pixels


class PositionedConnector(nn.Module):
    def __init__(self, inner: nn.Module, table: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("table", table)

    def num_tokens(self, num_patches: int) -> int:
        return self.inner.num_tokens(num_patches)

    def forward(self, x):
        return self.inner(x) + self.table


def patch_model(args) -> None:
    build = loop.build_model

    def build_model(cfg, tok, *a, **k):
        m = build(cfg, tok, *a, **k)
        if args.oracle:
            m.vision = Oracle(m.vision.embed_dim, cfg.data.grid)
        if args.vit_pos:
            kind, scale = args.vit_pos.split(":")
            w = m.vision.embeddings.position_embedding.weight
            with torch.no_grad():
                w.copy_(sincos_2d(math.isqrt(w.shape[0]), w.shape[1], float(scale)) if kind == "sincos"
                        else torch.randn_like(w) * float(scale))
        if args.lm_pos:
            table = sincos_2d(cfg.data.grid, m.lm.hidden_size, float(args.lm_pos.split(":")[1]))
            m.connector = PositionedConnector(m.connector, table)
        return m

    loop.build_model = build_model


def patch_lm(bidir: bool, mrope: bool) -> None:
    """`bidir`: the LM's mask lets image placeholders see each other both ways. `mrope`: image
    tokens get (start, start + row, start + col) rotary positions. Prefill and training only."""
    forward = vlm.VLM.forward
    causal_forward = decoder.LanguageModel.forward

    def vlm_forward(self, input_ids, pixel_values, labels=None, cache=None, **packed):
        self.lm.image_slots = input_ids == self.image_token_id
        return forward(self, input_ids, pixel_values, labels, cache, **packed)

    def lm_forward(self, input_ids=None, inputs_embeds=None, cache=None, position_ids=None, doc_ids=None):
        img, self.image_slots = getattr(self, "image_slots", None), None
        if img is None or (cache is not None and cache.seen()):  # decoding after the prompt
            return causal_forward(self, input_ids, inputs_embeds, cache, position_ids, doc_ids)
        x = inputs_embeds
        B, T, _ = x.shape
        positions = torch.arange(T).expand(B, T) if position_ids is None else position_ids
        head_dim = self.cfg.hidden_size // self.cfg.heads
        if mrope:
            cos, sin = mrope_tables(positions, img, head_dim, self.cfg.rope_theta, x.dtype)
        else:
            cos, sin = decoder.rope_tables(positions, head_dim, self.cfg.rope_theta, x.dtype)
        same = torch.ones(B, T, T, dtype=torch.bool) if doc_ids is None else doc_ids[:, :, None] == doc_ids[:, None, :]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = ((causal | (img[:, :, None] & img[:, None, :]) if bidir else causal) & same)[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        return self.lm_head(self.norm(x))

    vlm.VLM.forward, decoder.LanguageModel.forward = vlm_forward, lm_forward


def mrope_tables(positions, img, head_dim: int, theta: float, dtype, grid: int = 3, start: int = 2):
    """Like decoder.rope_tables, but frequency pair j rotates by axis j % 3 of (time, row, column).
    Image token k of the <bos> <|user|> <image>x9 layout sits at position start + k."""
    k = (positions - start).clamp(min=0)
    axes = torch.stack([torch.where(img, start, positions), torch.where(img, start + k // grid, positions),
                        torch.where(img, start + k % grid, positions)])  # (3, B, T)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (head_dim/2,)
    axis_of_pair = torch.arange(head_dim // 2) % 3
    freqs = axes[axis_of_pair].permute(1, 2, 0).float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def where_accuracy(run: str, n: int = 600) -> dict:
    """Accuracy on "where is the X?" over test scenes, overall and by object count (answering
    with a random object's position scores 1/count)."""
    from graft.data.stream import make_world
    from graft.eval.vqa import answer, normalise
    from graft.rundir import RunDir, build_processor

    cfg, tok, model, _ = RunDir(run).load()
    proc, world, rng = build_processor(cfg, tok, model), make_world(cfg), random.Random(0)
    items = []
    for i in range(n):
        s = world.sample("test", i)
        o = rng.choice(s.objects)
        if sum(p.name == o.name for p in s.objects) == 1:
            items.append((s.image, f"where is the {o.name}?", where(o), len(s.objects)))
    preds = answer(model, proc, [(img, q) for img, q, _, _ in items], cfg.eval.batch_size, 12)
    ok = [(normalise(pred) == truth, count) for pred, (_, _, truth, count) in zip(preds, items)]
    by_count = {c: round(sum(r for r, k in ok if k == c) / max(1, sum(k == c for _, k in ok)), 2) for c in range(1, 5)}
    return {"where": round(sum(r for r, _ in ok) / len(ok), 3), "where_by_object_count": by_count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mix", default="default")
    p.add_argument("--vit-pos")
    p.add_argument("--lm-pos")
    p.add_argument("--bidir", action="store_true")
    p.add_argument("--mrope", action="store_true")
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    if args.mix != "default":
        patch_mix(args.mix)
    if args.oracle:
        patch_oracle()
    if args.bidir or args.mrope:
        patch_lm(args.bidir, args.mrope)
    patch_model(args)
    base = ["train.progress=false", "eval.captions=0", "eval.splits=[test]", "eval.vqa_per_type=200"]
    cfg = apply_overrides(RECIPES["shapes_vqa"](), base + args.set)
    results = loop.train(cfg, args.out)
    print(json.dumps({k: round(v, 3) for k, v in results.items() if "vqa" in k}))
    if args.mix.startswith("where"):
        print(json.dumps(where_accuracy(args.out)))
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k not in ("out", "set", "bidir", "mrope", "oracle") and v and v != "default"]
    flags += [f"--{f}" for f in ("bidir", "mrope", "oracle") if getattr(args, f)] + [f"--set {s}" for s in args.set]
    print(" ".join(["command: python benchmarks/spatial_ablations.py --out", args.out, *flags]))


if __name__ == "__main__":
    main()
