"""Where a trained Shapes VLM keeps an object's position, and whether its LM selects the named object.

For 2-object test scenes it asks "<question> the <name>?" about one object (the *named* one) and
reports

- linear probes for the named object's column (left / centre / right), fitted on train-split
  scenes and scored on test scenes, from the ViT token of the object's cell and from the
  connector's output at the same slot, beside the majority-class rate (what a probe scores
  with no information);
- per LM layer, the attention of the question's colour word and of the last prompt token to the
  named object's image token vs to the other object's (the head with the largest gap).

Reproduce with:

    python benchmarks/spatial_probe.py RUN_DIR [--question "what size is the"]

It expects the default board (one ViT patch per cell, as in `shapes_vqa`).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import torch
import torch.nn.functional as F

from graft.data.world_source import make_world
from graft.models.decoder import apply_rope, rope_tables
from graft.build import build_processor, load_run
from graft.rundir import RunDir


def scenes(world, split: str, n: int):
    """(sample, named object, other object) for the first 2-object scenes with distinct names."""
    rng = random.Random(split)
    for index in range(n):
        s = world.sample(split, index)
        if len(s.objects) == 2 and s.objects[0].name != s.objects[1].name:
            named = rng.choice(s.objects)
            yield s, named, next(o for o in s.objects if o is not named)


def probe(x_train, y_train, x_test, y_test) -> float:
    """Test accuracy of a softmax-regression probe on standardised features."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    lin = torch.nn.Linear(x_train.shape[1], 3)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(400):
        opt.zero_grad()
        F.cross_entropy(lin(x_train), y_train).backward()
        opt.step()
    return (lin(x_test).argmax(1) == y_test).float().mean().item()


@torch.no_grad()
def image_features(model, proc, world, split: str, n: int, grid: int):
    vit, conn, cols = [], [], []
    for s, named, _ in scenes(world, split, n):
        f = model.vision.features(proc.pixels(s.image)[None])
        slot = named.row * grid + named.col
        vit.append(f[0, slot])
        conn.append(model.connector(f)[0, slot])
        cols.append(named.col)
    return torch.stack(vit), torch.stack(conn), torch.tensor(cols)


@torch.no_grad()
def attention_to_objects(model, proc, world, question: str, n: int, grid: int) -> dict:
    """{(layer, query): (heads, 2) mean attention to [named, other]} over the test scenes."""
    lm, tok = model.lm, proc.tok
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0]))
             for i, layer in enumerate(lm.layers)]
    totals, count = {}, 0
    for s, named, other in scenes(world, "test", n):
        ids = torch.tensor([proc.prompt(f"{question} {named.name}?")])
        model(ids, proc.pixels(s.image)[None])
        row = ids[0].tolist()
        first_image, T = row.index(tok.image), len(row)
        color_pos = len(proc.prompt(f"{question} {named.color}")) - 2  # last token of the colour word
        targets = [first_image + o.row * grid + o.col for o in (named, other)]
        cos, sin = rope_tables(torch.arange(T)[None], lm.cfg.hidden_size // lm.cfg.heads, lm.cfg.rope_theta, torch.float32)
        causal = torch.full((T, T), float("-inf")).triu(1)
        for i, layer in enumerate(lm.layers):
            a, x = layer.self_attn, seen[i]
            q = apply_rope(a.q_proj(x).view(1, T, a.heads, a.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(a.k_proj(x).view(1, T, a.kv_heads, a.head_dim).transpose(1, 2), cos, sin)
            k = k.repeat_interleave(a.heads // a.kv_heads, 1)
            att = ((q @ k.transpose(-1, -2)) * a.head_dim**-0.5 + causal).softmax(-1)[0]  # (H, T, T)
            for name, pos in (("colour word", color_pos), ("last prompt token", T - 1)):
                key = (i, name)
                totals[key] = totals.get(key, 0) + att[:, pos, targets]  # (H, 2)
        count += 1
    for h in hooks:
        h.remove()
    return {key: v / count for key, v in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--question", default="where is the", help="text before the object's name")
    args = p.parse_args()
    cfg, tok, model, _ = load_run(RunDir(args.run))
    if cfg.vision.image_size // cfg.vision.patch_size != cfg.data.grid:
        raise SystemExit("spatial_probe.py needs one ViT patch per board cell (image_size / patch_size == data.grid)")
    proc, world, grid = build_processor(cfg, tok, model), make_world(cfg), cfg.data.grid
    train = image_features(model, proc, world, "train", 6000, grid)
    test = image_features(model, proc, world, "test", 2000, grid)
    majority = Counter(test[2].tolist()).most_common(1)[0][1] / len(test[2])
    print(f"named object's column, linear probe on {len(test[2])} test objects (majority class {majority:.2f}):")
    for name, j in (("ViT token", 0), ("connector output", 1)):
        print(f"  {name:17} {probe(train[j], train[2], test[j], test[2]):.2f}")
    pos = model.vision.embeddings.position_embedding.weight
    print(f"ViT position table rms {pos.pow(2).mean().sqrt().item():.3f}; "
          f"ViT token rms {train[0].pow(2).mean().sqrt().item():.2f}")
    print(f'attention to the named vs the other object ("{args.question} <name>?"), best head per layer:')
    for (layer, query), m in sorted(attention_to_objects(model, proc, world, args.question, 300, grid).items()):
        h = int((m[:, 0] - m[:, 1]).argmax())
        print(f"  layer {layer} {query:17} head {h}: {m[h, 0]:.2f} vs {m[h, 1]:.2f}")
    print(f"\ncommand: python benchmarks/spatial_probe.py {args.run} --question '{args.question}'")


if __name__ == "__main__":
    main()
