"""Symbolic spatial-relation harness for graft's Shapes world (no ViT).

A row = 9 cell tokens (sum of learned embeddings of colour, shape, size, row, col; empty cells get
'empty' colour/shape/size but keep row/col) + the question's words + an answer token <a>; the
yes/no answer is predicted at <a> (cross-entropy over the whole word vocab through the tied head).
The decoder is graft's own `graft.models.decoder.LanguageModel` (Llama blocks, RoPE, GQA), fed
`inputs_embeds` and a `Layout` (positions, doc_ids for left padding, `visible` for bidirectional
cells). Scenes and spatial questions come from `graft.data.shapes.ShapesWorld` (grid 3, max 4
objects, the recipe's world); held-out evaluation uses the world's `val` split.

    python benchmarks/spatial_symbolic.py --name NAME [options]     # e.g. --annot 0.5 --qloss 1

One thread is enough (OMP_NUM_THREADS=1); each arm appends its curve to --out. docs/spatial.md
("Grounded spatial questions") has the arms that were run and their arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graft.data.shapes import COLORS, RELATIONS, SHAPES, SIZES, ShapesWorld, _unique
from graft.models.decoder import LanguageModel, Layout
from graft.models.lm_config import LMConfig

GRID = 3
WORDS = ["<pad>", "<a>", "<A>", "<B>"] + """is the left of right above below ? yes no which column row in
    what middle top bottom object there a and at , size""".split() + list(COLORS) + list(SHAPES) + list(SIZES)
VOCAB = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
COL_WORD = ("left", "middle", "right")
ROW_WORD = ("top", "middle", "bottom")


def tok(q: str) -> list[int]:
    return [VOCAB[w] for w in q.replace("?", " ?").replace(",", " ,").split()]


# ----------------------------------------------------------------------------- data
class Source:
    """Scenes of `split` in index order, with the world's own spatial question, and extra kinds."""

    def __init__(self, split: str, seed: int, start: int = 0):
        self.world = ShapesWorld(image_size=24, grid=GRID, max_objects=4, seed=0)
        self.split, self.i = split, start
        self.rng = random.Random(f"extra/{split}/{seed}")

    def next_scene(self, nobj: int | None = None):
        while True:
            objects, _, qa = self.world._content(self.split, self.i)
            self.i += 1
            if nobj is not None and len(objects) != nobj:
                continue
            return objects, qa

    def spatial(self, nobj=None, rels=None):
        while True:
            objects, qa = self.next_scene(nobj)
            q = next((x for x in qa if x.kind == "spatial"), None)
            if q is None:
                continue
            if rels is not None and not any(f" {r} the " in q.question for r in rels):
                continue
            return objects, q.question, q.answer

    def where(self, nobj=None):
        """One named object's column or row: 'which column is the red circle in?' -> left/middle/right."""
        while True:
            objects, _ = self.next_scene(nobj)
            named = _unique(objects, lambda o: o.name)
            if not named:
                continue
            o = self.rng.choice(named)
            if self.rng.random() < 0.5:
                return objects, f"which column is the {o.name} in?", COL_WORD[o.col]
            return objects, f"which row is the {o.name} in?", ROW_WORD[o.row]

    def gcap(self, nobj=None, shuffle=False):
        """Grounded caption (Kosmos-2 style): the world's caption with each object's cell after its
        name, 'a large red circle at top left and a small blue square at bottom middle'; no yes/no
        answer, the loss is on the location words only."""
        objects, _ = self.next_scene(nobj)
        order = sorted(objects, key=lambda o: (o.row, o.col))
        if shuffle:
            order = self.rng.sample(objects, len(objects))
        parts = [f"a {o.size} {o.color} {o.shape} at {ROW_WORD[o.row]} {COL_WORD[o.col]}" for o in order]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return objects, text, None, True

    def gsize(self, nobj=None):
        """A grounded question of another kind: 'what size is the red circle at top left?' -> its size."""
        while True:
            objects, _ = self.next_scene(nobj)
            named = _unique(objects, lambda o: o.name)
            if named:
                o = self.rng.choice(named)
                return objects, f"what size is the {o.name} at {ROW_WORD[o.row]} {COL_WORD[o.col]}?", o.size, True

    def gcapr(self, nobj=None):
        return self.gcap(nobj, shuffle=True)

    def colq(self, nobj=None):
        """Relation of a named object to a fixed line, in the spatial question's own form:
        'is the red circle left of the middle column?' / 'above the middle row?' (yes/no balanced)."""
        while True:
            objects, _ = self.next_scene(nobj)
            named = _unique(objects, lambda o: o.name)
            if not named:
                continue
            o = self.rng.choice(named)
            want = self.rng.random() < 0.5
            opts = []
            for rel in RELATIONS:
                for k in range(GRID):
                    if rel in ("left of", "right of"):
                        truth = o.col < k if rel == "left of" else o.col > k
                        ref = f"the {COL_WORD[k]} column"
                    else:
                        truth = o.row < k if rel == "above" else o.row > k
                        ref = f"the {ROW_WORD[k]} row"
                    if truth == want:
                        opts.append((rel, ref, truth))
            rel, ref, truth = self.rng.choice(opts)
            return objects, f"is the {o.name} {rel} {ref}?", "yes" if truth else "no"


def cells_of(objects):
    """(9, 5) ints: colour, shape, size (0 = empty), row, col."""
    grid = [[0, 0, 0, r, c] for r in range(GRID) for c in range(GRID)]
    for o in objects:
        grid[o.row * GRID + o.col][:3] = [1 + list(COLORS).index(o.color), 1 + SHAPES.index(o.shape), 1 + SIZES.index(o.size)]
    return grid


def name_spans(q: list[int]):
    """Indices of the words of the first and second 'the COLOUR SHAPE' in a tokenized question."""
    the, spans = VOCAB["the"], []
    for i, t in enumerate(q):
        if t == the and i + 2 < len(q) and WORDS[q[i + 1]] in COLORS and WORDS[q[i + 2]] in SHAPES:
            spans.append((i + 1, i + 2))
    return spans


# ----------------------------------------------------------------------------- model
class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        cfg = LMConfig(vocab_size=len(VOCAB), hidden_size=a.hidden, layers=a.layers, heads=a.heads,
                       kv_heads=a.kv_heads or a.heads, intermediate_size=a.hidden * 3, init_std=a.init_std)
        self.a, self.lm = a, LanguageModel(cfg)
        std = a.init_std or a.hidden ** -0.5
        self.tabs = nn.ModuleList(nn.Embedding(n, a.hidden) for n in (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1, GRID, GRID))
        self.role = nn.Embedding(3, a.hidden)  # 0 none, 1 first-named object's words, 2 second's
        for e in list(self.tabs) + [self.role]:
            nn.init.normal_(e.weight, std=std)
        nn.init.zeros_(self.role.weight[0])
        self.aux = nn.Linear(a.hidden, 2 * GRID)  # --auxpos: row and col of a named object

    def forward(self, batch):
        cells = self.tabs[0](batch["cells"][..., 0])
        for k in range(1, 5):
            cells = cells + self.tabs[k](batch["cells"][..., k])
        words = self.lm.embed_tokens(batch["ids"]) + self.role(batch["role"])
        x = words.clone()
        x[batch["is_cell"]] = cells.reshape(-1, cells.shape[-1])
        layout = Layout(position_ids=batch["pos"], doc_ids=batch["doc"], visible=batch["visible"])
        hidden = {len(self.lm.layers) - 1: None}
        logits = self.lm(inputs_embeds=x, layout=layout, hidden=hidden)
        return logits, hidden[len(self.lm.layers) - 1]


def collate(examples, a):
    """Left-padded rows, answer token last. layout img: cells, question, <a>; qfirst: question, cells, <a>."""
    rows = []
    for ex in examples:
        objects, q, ans = ex[:3]
        annotated = len(ex) > 3
        qt = tok(q)
        spans = name_spans(qt)
        role = [0] * len(qt)
        if a.roles:
            for r, span in enumerate(spans[:2]):
                for i in span:
                    role[i] = r + 1
        if a.layout == "img":
            ids, isc, rl = [0] * 9 + qt + [VOCAB["<a>"]], [1] * 9 + [0] * len(qt) + [0], [0] * 9 + role + [0]
            qoff = 9
        else:
            ids, isc, rl = qt + [0] * 9 + [VOCAB["<a>"]], [0] * len(qt) + [1] * 9 + [0], role + [0] * 9 + [0]
            qoff = 0
        rows.append((ids, isc, rl, qoff, qt, spans, cells_of(objects), -100 if ans is None else VOCAB[ans], objects, annotated))
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    isc = torch.zeros(B, T, dtype=torch.bool)
    role = torch.zeros(B, T, dtype=torch.long)
    doc = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    visible = torch.zeros(B, T, T, dtype=torch.bool) if (a.bidir or a.prefix) else None
    qtarget = torch.full((B, T), -100, dtype=torch.long)
    auxt = torch.full((B, T, 2), -100, dtype=torch.long)
    cells = torch.tensor([r[6] for r in rows])
    ans = torch.tensor([r[7] for r in rows])
    for b, (i_, c_, r_, qoff, qt, spans, _, _, objects, annotated) in enumerate(rows):
        p = T - len(i_)
        ids[b, p:], isc[b, p:], role[b, p:] = torch.tensor(i_), torch.tensor(c_, dtype=torch.bool), torch.tensor(r_)
        doc[b, p:] = 1
        pos[b, p:] = torch.arange(len(i_))
        cstart = p + (0 if a.layout == "img" else len(qt))
        if a.bidir:
            visible[b, cstart:cstart + 9, cstart:cstart + 9] = True
        if a.prefix:  # prefix-LM (PaliGemma): cells and question words all see each other; <a> is last anyway
            visible[b, p:T - 1, p:T - 1] = True
        qs = p + qoff
        for t in range(len(qt) - 1):  # next-token targets inside the question
            if annotated:  # only the location words of a grounded question
                if qt[t] == VOCAB["at"] or (t > 0 and qt[t - 1] == VOCAB["at"]):
                    qtarget[b, qs + t] = qt[t + 1]
            elif not a.annot and "gcap" not in a.mix and "gsize" not in a.mix:
                qtarget[b, qs + t] = qt[t + 1]
        if a.auxpos:
            byname = {o.name: o for o in objects}
            for (ci, si) in spans:
                o = byname.get(f"{WORDS[qt[ci]]} {WORDS[qt[si]]}")
                if o is not None:
                    auxt[b, qs + si] = torch.tensor([o.row, o.col])
    return dict(ids=ids, is_cell=isc, role=role, doc=doc, pos=pos, visible=visible, cells=cells, ans=ans,
                qtarget=qtarget, auxt=auxt)


# ----------------------------------------------------------------------------- training
def draw(src: Source, a, step: int):
    """One training example by the arm's mix / curriculum."""
    r = src.rng.random()
    stage1 = step < a.curric
    nobj = 2 if (stage1 and a.curric_2obj) or a.only2 else None
    mix = a.mix1 if stage1 else a.mix
    acc = 0.0
    for part in filter(None, mix.split(",")):
        kind, frac = part.split(":")
        acc += float(frac)
        if r < acc:
            return getattr(src, kind)(nobj)
    if a.rels:
        return src.spatial(nobj, a.rels.split("|"))
    objects, q, ans = src.spatial(nobj)
    if a.annot and src.rng.random() < a.annot:  # Kosmos-2-style grounded text: each name followed by its cell
        for o in objects:
            q = q.replace(f"the {o.name} ", f"the {o.name} at {ROW_WORD[o.row]} {COL_WORD[o.col]} ").replace(
                f"the {o.name}?", f"the {o.name} at {ROW_WORD[o.row]} {COL_WORD[o.col]}?")
        return objects, q, ans, True
    return objects, q, ans


@torch.no_grad()
def evaluate(model, val, a):
    model.eval()
    correct, yes = 0, 0
    for i in range(0, len(val), 256):
        batch = collate(val[i:i + 256], a)
        logits, _ = model(batch)
        pred = logits[:, -1].argmax(-1)
        correct += (pred == batch["ans"]).sum().item()
        yes += (pred == VOCAB["yes"]).sum().item()
    model.train()
    return correct / len(val), yes / len(val)


def optimizer(model: nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices, not on embeddings, tables and norms."""
    def decays(n, p):
        return p.dim() >= 2 and "embed" not in n and "tabs" not in n and "role" not in n

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_at(s: int, a) -> float:
    """Linear warmup over a.warmup steps, then cosine to a.lr * a.min_lr_ratio at a.steps."""
    if s < a.warmup:
        return a.lr * (s + 1) / a.warmup
    f = (s - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * f)))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--init_std", type=float, default=0.0)
    p.add_argument("--layout", choices=("img", "qfirst"), default="img")
    p.add_argument("--bidir", action="store_true", help="cell tokens see each other")
    p.add_argument("--prefix", action="store_true", help="cells + question bidirectional (prefix-LM)")
    p.add_argument("--roles", action="store_true", help="role embeddings on the first/second name's words")
    p.add_argument("--qloss", type=float, default=0.0, help="weight of next-token loss on question words")
    p.add_argument("--annot", type=float, default=0.0, help="share of spatial questions grounded ('the red circle at top left'); needs --qloss")
    p.add_argument("--auxpos", type=float, default=0.0, help="weight of row/col targets at each name's shape word")
    p.add_argument("--mix", default="", help="e.g. where:0.3,colq:0.3 (rest: world spatial questions)")
    p.add_argument("--mix1", default="", help="mix during the first --curric steps")
    p.add_argument("--curric", type=int, default=0)
    p.add_argument("--curric_2obj", action="store_true", help="2-object scenes in the first --curric steps")
    p.add_argument("--only2", action="store_true")
    p.add_argument("--rels", default="", help="restrict training relations, e.g. 'left of|right of'")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--nval", type=int, default=600)
    p.add_argument("--stop_at", type=float, default=0.0, help="stop once val accuracy >= this, twice in a row")
    p.add_argument("--out", default="runs/spatial_symbolic/results.jsonl")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    model = Model(a)
    nparam = sum(p.numel() for p in model.lm.parameters())
    vs = Source("val", a.seed)
    val = [vs.spatial() for _ in range(a.nval)]
    src = Source("train", a.seed, start=a.seed * 10_000_000)
    opt = optimizer(model, a.lr, a.wd)

    curve, t0, hit, run_hits = [], time.time(), {}, 0
    train_time = 0.0
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            acc, yes = evaluate(model, val, a)
            curve.append((step, round(acc, 3), round(yes, 2), round(train_time, 1)))
            for thr in (0.65, 0.75, 0.85, 0.95):
                if acc >= thr and thr not in hit:
                    hit[thr] = (step, round(train_time, 1))
            print(f"{a.name} step {step} acc {acc:.3f} yes {yes:.2f} t {train_time:.0f}s", flush=True)
            run_hits = run_hits + 1 if a.stop_at and acc >= a.stop_at else 0
            if run_hits >= 2 or step == a.steps:
                break
        ts = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        batch = collate([draw(src, a, step) for _ in range(a.batch)], a)
        logits, h = model(batch)
        loss = F.cross_entropy(logits[:, -1], batch["ans"], ignore_index=-100)
        if a.qloss:
            loss = loss + a.qloss * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["qtarget"].reshape(-1), ignore_index=-100)
        if a.auxpos and (batch["auxt"][..., 0] >= 0).any():
            ax = model.aux(h)
            m = batch["auxt"][..., 0] >= 0
            loss = loss + a.auxpos * (F.cross_entropy(ax[m][:, :GRID], batch["auxt"][m][:, 0]) + F.cross_entropy(ax[m][:, GRID:], batch["auxt"][m][:, 1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.time() - ts
    res = dict(name=a.name, args=vars(a), lm_params=nparam, final=curve[-1][1], best=max(c[1] for c in curve),
               hit={str(k): v for k, v in hit.items()}, curve=curve, wall=round(time.time() - t0, 1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps({k: res[k] for k in ("name", "lm_params", "final", "best", "hit", "wall")}))


if __name__ == "__main__":
    main(sys.argv[1:])
