"""Scores computed directly from a model's forward pass, with none of graft's evaluation code, so
that a test can hold an evaluation task against an independent computation."""

from functools import lru_cache
from pathlib import Path

import torch

from graft.build import build_processor, load_run
from graft.rundir import RunDir
from graft.trainer.checkpoint import latest


@lru_cache(maxsize=4)
def _loaded(run: str, checkpoint: str):
    cfg, tok, model, _ = load_run(RunDir(Path(run)))
    return cfg, tok, model, build_processor(cfg, tok, model)


def loaded(run):
    """(config, tokenizer, model, processor) of a run's latest checkpoint, loaded once."""
    return _loaded(str(run), latest(Path(run) / "checkpoints").name)


def direct_zero_shot(run, images, labels, classes, templates) -> dict[str, float]:
    """Zero-shot scores computed here, from the model's two encoders alone (CLIP §3.1.4), with none
    of graft's evaluation code: per class the renormalised mean of its templates' text embeddings,
    one image at a time, top-1 / top-5 / mean per-class recall counted by hand."""
    cfg, tok, model, proc = loaded(run)
    with torch.no_grad():
        text = torch.stack([torch.nn.functional.normalize(
            torch.nn.functional.normalize(model.encode_text(**proc.texts([t.format(c) for t in templates])), dim=-1)
            .mean(0), dim=0) for c in classes])  # (C, E)
        ranked = [(model.encode_image(proc.pixels(im)[None])[0] @ text.T).argsort(descending=True).tolist()
                  for im in images]
    top1 = [r[0] == y for r, y in zip(ranked, labels)]
    per_class = {y: [t for t, l in zip(top1, labels) if l == y] for y in set(labels)}
    return {"zeroshot_acc": sum(top1) / len(top1),
            "zeroshot_top5": sum(y in r[:5] for r, y in zip(ranked, labels)) / len(labels),
            "zeroshot_mean_per_class_recall": sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)}


def greedy(run, image, text: str) -> str:
    """The model's greedy answer computed here: a full forward pass per new token (no cache, no
    batching, none of graft's evaluation code), up to eval.max_new_tokens or the end token."""
    cfg, tok, model, proc = loaded(run)
    seq, new = torch.tensor([proc.prompt(text)]), []
    with torch.no_grad():
        for _ in range(cfg.eval.max_new_tokens):
            nxt = int(model(seq, proc.pixels(image)[None])[0][0, -1].argmax())
            if nxt == tok.eos:
                break
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    return tok.decode(new)
