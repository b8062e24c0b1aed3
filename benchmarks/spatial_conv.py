"""The symbolic spatial harness (spatial_symbolic.py) trained on the recipe's conversations.

spatial_symbolic.py trains on spatial questions alone; the recipe (`shapes_vqa`) trains on
conversations of every question the scene allows (colour, shape, size, count, exist, spatial; in
random order, one loss averaged over every answer token). This harness keeps the oracle cells
(no ViT) and the recipe's decoder and trains on those conversations, so that what the mix of
question types does to the spatial circuit is measured apart from what pixels do:

    row = 9 cell tokens, then for each turn: the question's words, <a>, the answer word
    loss = cross-entropy at every <a> (its answer) and, in a grounded spatial question
           (--annot), at the location words; one mean over all of them, as the recipe's

    python benchmarks/spatial_conv.py --name NAME [--annot 0.5] [--spatial-weight 3]

Signals for the comparison itself (docs/spatial.md, session 24): --auxcmp W (a head at each spatial
question's <a> predicting how the two named objects' columns and rows compare, as
`data.spatial_compare`), --cmpword P (that comparison as a supervised word after the "?"),
--relq K (K "where is X from Y ?" questions a scene, answered by that word).

It scores the world's `val` split: spatial questions (as spatial_symbolic.py) and every other type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_symbolic import COL_WORD, GRID, ROW_WORD, VOCAB, WORDS, Model, Source, cells_of, evaluate, lr_at, name_spans, optimizer, tok

from graft.data.grounding import comparison, order
from graft.data.shapes import QUESTION_TYPES, _question


def _grow_vocab(extra: bool) -> None:
    """Every word of the world's questions and answers (spatial_symbolic's list holds the spatial ones)."""
    src = Source("train", 0)
    for _ in range(3000):
        _, qa = src.next_scene()
        for q in qa:
            for w in (q.question.replace("?", " ?") + " " + q.answer).split():
                if w not in VOCAB:
                    VOCAB[w] = len(WORDS)
                    WORDS.append(w)
    for w in ("where", "from", *PLACEMENTS) if extra else ():
        if w not in VOCAB:
            VOCAB[w] = len(WORDS)
            WORDS.append(w)
    PLACEMENT_IDS.update(VOCAB[w] for w in PLACEMENTS if w in VOCAB)


PLACEMENTS = [f"{c}-{r}" for c in ("left", "same", "right") for r in ("above", "level", "below")]
PLACEMENT_IDS: set[int] = set()


def placement(src: Source, objects):
    """--relq: "where is the X from the Y ?" answered by one word naming how X's column and row compare with Y's."""
    named = [o for o in objects if sum(p.name == o.name for p in objects) == 1]
    x, y = src.rng.sample(named, 2)
    return tok(f"where is the {x.name} from the {y.name} ?"), VOCAB[PLACEMENTS[3 * order(x.col, y.col) + order(x.row, y.row)]]


def compare(question: str, objects) -> int:
    """Index into PLACEMENTS of how the question's first named object sits relative to its second."""
    col, row = comparison(question, objects)
    return 3 * col + row


def ground(q: str, objects) -> str:
    for o in objects:
        at = f" at {ROW_WORD[o.row]} {COL_WORD[o.col]}"
        q = q.replace(f"the {o.name} ", f"the {o.name}{at} ").replace(f"the {o.name}?", f"the {o.name}{at}?")
    return q


def conversation(src: Source, a):
    """One scene's turns [(question ids, answer id, kind, grounded)] in random order."""
    objects, qa = src.next_scene()
    qa = src.rng.sample(qa, min(a.questions, len(qa)))
    if any(q.kind == "spatial" for q in qa):  # --extra-spatial: more spatial questions about the scene
        qa += [_question("spatial", objects, src.rng, None) for _ in range(a.extra_spatial)]
        src.rng.shuffle(qa)
    turns = []
    if any(q.kind == "spatial" for q in qa):
        turns += [(*placement(src, objects), "relq", False) for _ in range(a.relq)]
    for q in qa:
        grounded = q.kind == "spatial" and src.rng.random() < a.annot
        ids = tok(ground(q.question, objects) if grounded else q.question)
        if q.kind == "spatial" and a.cmpword and src.rng.random() < a.cmpword:
            ids = ids + [VOCAB[PLACEMENTS[compare(q.question, objects)]]]  # predicted at "?"
        turns.append((ids, VOCAB[q.answer], q.kind, grounded))
    if a.relq:
        src.rng.shuffle(turns)
    return objects, turns


def collate_conv(examples, a):
    """Left-padded conversations; targets at every <a> and at grounded questions' location words."""
    rows = []
    for objects, turns in examples:
        ids, tgt, wt, aux, cmp = [0] * 9, [-100] * 9, [0.0] * 9, {}, {}
        byname = {o.name: o for o in objects}
        for q, ans, kind, grounded in turns:
            start = len(ids)
            if kind == "spatial":  # --auxpos: each named object's row and column at its shape word
                for ci, si in name_spans(q):
                    o = byname.get(f"{WORDS[q[ci]]} {WORDS[q[si]]}")
                    if o is not None:
                        aux[start + si] = (o.row, o.col)
                named = [byname.get(f"{WORDS[q[ci]]} {WORDS[q[si]]}") for ci, si in name_spans(q)[:2]]
                if len(named) == 2 and None not in named:  # --auxcmp: how the two compare, at <a>
                    x, y = named
                    cmp[start + len(q)] = (order(x.col, y.col), order(x.row, y.row))
            ids += q + [VOCAB["<a>"], ans]
            tgt += [-100] * len(q) + [ans, -100]
            wt += [0.0] * len(q) + [a.spatial_weight if kind == "spatial" else 1.0, 0.0]
            if q[-1] in PLACEMENT_IDS:  # --cmpword: "?" predicts the comparison word
                tgt[start + len(q) - 2], wt[start + len(q) - 2] = q[-1], 1.0
            if grounded:  # "at" predicts the row word, the row word the column word
                for t in range(len(q) - 1):
                    if q[t] == VOCAB["at"] or (t > 0 and q[t - 1] == VOCAB["at"]):
                        tgt[start + t], wt[start + t] = q[t + 1], a.loc_weight
        rows.append((ids, tgt, wt, cells_of(objects), aux, cmp))
    T, B = max(len(r[0]) for r in rows), len(rows)
    batch = dict(ids=torch.zeros(B, T, dtype=torch.long), is_cell=torch.zeros(B, T, dtype=torch.bool),
                 role=torch.zeros(B, T, dtype=torch.long), doc=torch.zeros(B, T, dtype=torch.long),
                 pos=torch.zeros(B, T, dtype=torch.long), visible=None, cells=torch.tensor([r[3] for r in rows]),
                 tgt=torch.full((B, T), -100, dtype=torch.long), wt=torch.zeros(B, T),
                 auxt=torch.full((B, T, 2), -100, dtype=torch.long), cmpt=torch.full((B, T, 2), -100, dtype=torch.long))
    for b, (ids, tgt, wt, _, aux, cmp) in enumerate(rows):
        p = T - len(ids)
        for t, cell in aux.items():
            batch["auxt"][b, p + t] = torch.tensor(cell)
        for t, signs in cmp.items():
            batch["cmpt"][b, p + t] = torch.tensor(signs)
        batch["ids"][b, p:] = torch.tensor(ids)
        batch["is_cell"][b, p:p + 9] = True
        batch["doc"][b, p:] = 1
        batch["pos"][b, p:] = torch.arange(len(ids))
        batch["tgt"][b, p:] = torch.tensor(tgt)  # what position t predicts (already next-token aligned)
        batch["wt"][b, p:] = torch.tensor(wt)
    return batch


def val_sets(n: int):
    """n `val` questions of each type, as (objects, question, answer) rows for spatial_symbolic's collate."""
    src, sets = Source("val", 0), {k: [] for k in QUESTION_TYPES}
    while min(len(v) for v in sets.values()) < n:
        objects, qa = src.next_scene()
        for q in qa:
            if len(sets[q.kind]) < n:
                sets[q.kind].append((objects, q.question, q.answer))
    return sets


@torch.no_grad()
def location_accuracy(model, rows, a) -> float:
    """Share of a grounded question's location words predicted right (teacher-forced), on `val` scenes."""
    model.eval()
    batch = collate_conv(rows, a)
    logits, _ = model(batch)
    m = (batch["tgt"] >= 0) & (batch["ids"] != VOCAB["<a>"])
    model.train()
    return (logits[m].argmax(-1) == batch["tgt"][m]).float().mean().item()


def grounded_val(sets) -> list:
    return [(objects, [(tok(ground(q, objects)), VOCAB[ans], "spatial", True)]) for objects, q, ans in sets["spatial"]]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="conv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--questions", type=int, default=6, help="turns per conversation (the recipe's 6)")
    p.add_argument("--annot", type=float, default=0.0, help="share of spatial questions grounded")
    p.add_argument("--loc-weight", dest="loc_weight", type=float, default=1.0)
    p.add_argument("--spatial-weight", dest="spatial_weight", type=float, default=1.0)
    p.add_argument("--auxpos", type=float, default=0.0, help="weight of a row/column head at each name of a spatial question")
    p.add_argument("--auxcmp", type=float, default=0.0,
                   help="weight of a head at a spatial question's <a> predicting how the two named objects' columns and rows compare")
    p.add_argument("--cmpword", type=float, default=0.0,
                   help="share of spatial questions followed by a supervised word saying how the two named objects compare")
    p.add_argument("--relq", type=int, default=0, help="placement questions added per scene with a spatial question")
    p.add_argument("--extra-spatial", dest="extra_spatial", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--nval", type=int, default=500)
    p.add_argument("--out", default="runs/spatial_conv/results.jsonl")
    a = p.parse_args(argv)
    a.init_std, a.roles, a.layout, a.bidir, a.prefix, a.mix = 0.0, False, "img", False, False, ""
    _grow_vocab(a.relq > 0 or a.cmpword > 0)
    torch.manual_seed(a.seed)
    model = Model(a)
    if a.auxcmp:
        model.cmp = torch.nn.Linear(a.hidden, 6)
    sets = val_sets(a.nval)
    gval = grounded_val(sets)
    src = Source("train", a.seed, start=a.seed * 10_000_000)
    opt = optimizer(model, a.lr, 0.05)

    curve, t0 = [], time.time()
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            accs = {k: round(evaluate(model, v, a)[0], 3) for k, v in sets.items()}
            accs["location"] = round(location_accuracy(model, gval, a), 3)
            curve.append((step, accs))
            print(a.name, step, " ".join(f"{k} {v:.3f}" for k, v in accs.items()), f"t {time.time() - t0:.0f}s", flush=True)
            if step == a.steps:
                break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        batch = collate_conv([conversation(src, a) for _ in range(a.batch)], a)
        logits, h = model(batch)
        m = batch["tgt"] >= 0
        per = F.cross_entropy(logits[m], batch["tgt"][m], reduction="none")
        loss = (per * batch["wt"][m]).sum() / m.sum()
        at = batch["auxt"][..., 0] >= 0
        if a.auxpos and at.any():
            ax, cell = model.aux(h)[at], batch["auxt"][at]
            loss = loss + a.auxpos * (F.cross_entropy(ax[:, :GRID], cell[:, 0]) + F.cross_entropy(ax[:, GRID:], cell[:, 1]))
        ct = batch["cmpt"][..., 0] >= 0
        if a.auxcmp and ct.any():
            cx, signs = model.cmp(h)[ct], batch["cmpt"][ct]
            loss = loss + a.auxcmp * (F.cross_entropy(cx[:, :3], signs[:, 0]) + F.cross_entropy(cx[:, 3:], signs[:, 1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    res = dict(name=a.name, args=vars(a), final=curve[-1][1], curve=curve, wall=round(time.time() - t0, 1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
