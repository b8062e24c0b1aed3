"""Zero-shot classification with a dual encoder (CLIP §3.1.4): embed each class name in every prompt
template, average the normalised embeddings over templates (the "ensemble"), renormalise, and
predict the class whose embedding is closest to the image's.

On the built-in world the classes are its 24 colour x shape names and the images have exactly one
object (a world with max_objects=1), so the label — the colour and shape of *the* object — is
unambiguous. The default templates follow the world's caption style ("a small red circle").
A user's file (YAML or JSON) may replace `classes` (one name per world class, in the world's
order: red circle, red square, ...) and/or `templates` (each containing `{}`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from graft.data.images import open_within
from graft.data.samples import BadSample
from graft.data.shapes import CLASSES, ShapesWorld
from graft.errors import UserError
from graft.data.world_source import LABEL_TEMPLATES
from graft.eval.shard import shard_map

TEMPLATES = list(LABEL_TEMPLATES)  # the built-in world's (data/world_source.py)


def check_prompts(classes: list[str], templates: list[str], where: str, expected: int = len(CLASSES)) -> None:
    if not classes:
        raise UserError(f"{where}: the class list is empty")
    if not templates:
        raise UserError(f"{where}: the template list is empty")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise UserError(f"{where}: template {t!r} has no '{{}}' for the class name")
    if len(classes) != expected:
        world = f" (one name per class, in its order: {', '.join(CLASSES[:3])}, ...)" if expected == len(CLASSES) else ""
        raise UserError(f"{where}: {len(classes)} classes given; the data has {expected}{world}")


def read_prompts(path: str) -> tuple[list[str] | None, list[str] | None]:
    """`classes` and `templates` of a user's YAML/JSON file (None where it gives none)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"eval.zeroshot_file: file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"eval.zeroshot_file: {path} is not YAML/JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or not set(data) <= {"classes", "templates"}:
        raise UserError(f"eval.zeroshot_file: {path} must be a mapping with keys 'classes' and/or 'templates'")
    classes, templates = data.get("classes"), data.get("templates")
    if not isinstance(classes, (list, type(None))) or not isinstance(templates, (list, type(None))):
        raise UserError(f"eval.zeroshot_file: {path}: 'classes' and 'templates' must be lists")
    return ([str(c) for c in classes] if classes is not None else None), templates


def load_prompts(path: str | None) -> tuple[list[str], list[str]]:
    """Classes and templates for the built-in world: its own, or those a user's YAML/JSON file gives."""
    classes, templates = read_prompts(path) if path else (None, None)
    classes = list(CLASSES) if classes is None else classes
    templates = list(TEMPLATES) if templates is None else templates
    check_prompts(classes, templates, f"eval.zeroshot_file {path}")
    return classes, templates


@torch.no_grad()
def class_embeddings(model, proc, classes: list[str], templates: list[str], batch_size: int) -> torch.Tensor:
    """(C, E): per class, the renormalised mean over templates of the normalised text embeddings."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = embed_texts(model, proc, texts, batch_size).view(len(classes), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(1), dim=-1)


def embed_texts(model, proc, texts: list[str], batch_size: int) -> torch.Tensor:
    """(len(texts), E), each process embedding its share (eval/shard.py)."""
    def share(part):
        device = next(model.parameters()).device
        with torch.no_grad():
            out = [model.encode_text(**{k: v.to(device) for k, v in proc.texts(part[i:i + batch_size]).items()})
                   for i in range(0, len(part), batch_size)]
        return list(torch.cat(out).float().cpu())

    return torch.stack(shard_map(share, texts))


def embed_images(model, proc, images, batch_size: int) -> torch.Tensor:
    """(len(images), ...) image embeddings, each process embedding its share (eval/shard.py)."""
    def share(part):
        device = next(model.parameters()).device
        with torch.no_grad():
            batches = (proc.inputs([proc.pixels(im) for im in part[i:i + batch_size]]) for i in range(0, len(part), batch_size))
            out = [model.encode_image(**{k: v.to(device) for k, v in b.items()}) for b in batches]
        return list(torch.cat(out).float().cpu())

    return torch.stack(shard_map(share, images))


def zero_shot(model, proc, world: ShapesWorld, split: str, n: int, prompts_file: str | None,
              batch_size: int) -> tuple[dict[str, float], list[dict]]:
    """Top-1 / top-5 accuracy on the first n single-object images of `split`, and the predictions."""
    classes, templates = load_prompts(prompts_file)
    single = ShapesWorld(world.image_size, world.grid, max_objects=1, seed=world.seed)
    samples = [single.sample(split, i) for i in range(n)]
    labels = torch.tensor([s.label for s in samples])
    sims = model.similarity(embed_images(model, proc, [s.image for s in samples], batch_size),
                            class_embeddings(model, proc, classes, templates, batch_size))  # (n, C)
    top = sims.topk(min(5, len(classes)), dim=1).indices
    predictions = [{"id": f"{split}/single/{i}", "prediction": classes[t], "reference": classes[s.label],
                    "correct": t == s.label} for i, (t, s) in enumerate(zip(top[:, 0].tolist(), samples))]
    return {"zeroshot_acc": (top[:, 0] == labels).float().mean().item(),
            "zeroshot_top5": (top == labels[:, None]).any(1).float().mean().item()}, predictions


# ---- a user's labelled images (eval/labelled.py): `graft eval RUN --task zeroshot --data PATH` ----

USER_TEMPLATES = ["a photo of a {}."]  # CLIP's default prompt, for data sets that ship none


def user_prompts(data, cfg) -> tuple[list[str], list[str]]:
    """Classes and templates for a LabelledSet: `eval.zeroshot_file` where it gives them, else the
    data set's own, else CLIP's "a photo of a {}."."""
    given_classes, given_templates = read_prompts(cfg.eval.zeroshot_file) if cfg.eval.zeroshot_file else (None, None)
    classes = given_classes if given_classes is not None else data.classes
    templates = given_templates or data.templates or USER_TEMPLATES
    check_prompts(classes, templates, f"zero-shot prompts for {data.name}", len(data.classes))
    return classes, templates


@torch.no_grad()
def zero_shot_on(model, proc, data, cfg) -> tuple[dict[str, float], list[dict]]:
    """A dual encoder on a LabelledSet: the class whose text embedding is closest to the image's."""
    classes, templates = user_prompts(data, cfg)
    text = class_embeddings(model, proc, classes, templates, cfg.eval.batch_size)
    return classify(data, cfg, classes,
                    lambda images: model.similarity(embed_images(model, proc, images, cfg.eval.batch_size), text))


def classify(data, cfg, classes: list[str], scores) -> tuple[dict[str, float], list[dict]]:
    """Top-1, top-5 and mean per-class recall on a LabelledSet, and one prediction per image.

    `scores(images)` gives (len(images), len(classes)) class scores for a batch of PIL images;
    images are decoded through the training data's limits (a bad one is skipped and counted)."""
    d, labels, tops, predictions, batch = cfg.data, [], [], [], []

    def flush():
        for (key, _, label), top in zip(batch, scores([im for _, im, _ in batch]).topk(min(5, len(classes)), dim=1).indices.tolist()):
            labels.append(label), tops.append(top)
            predictions.append({"id": key, "prediction": classes[top[0]], "reference": classes[label],
                                "correct": top[0] == label})
        batch.clear()

    for key, raw, label in tqdm(data.items(), desc="zeroshot", unit="image", disable=not sys.stderr.isatty()):
        try:
            image, _ = open_within(raw, d)
        except BadSample as e:
            data.log.skip(e.reason, key, e.detail)
            continue
        batch.append((key, image, label))
        if len(batch) == cfg.eval.batch_size:
            flush()
    if batch:
        flush()
    if not labels:
        raise UserError(f"--data {data.name}: no usable image (skipped: {dict(data.log.skipped)})")
    lab, top = torch.tensor(labels), torch.tensor([t + [-1] * (5 - len(t)) for t in tops])
    hit = top[:, 0] == lab
    recall = [hit[lab == c].float().mean().item() for c in lab.unique().tolist()]
    return {"zeroshot_acc": hit.float().mean().item(), "zeroshot_top5": (top == lab[:, None]).any(1).float().mean().item(),
            "zeroshot_mean_per_class_recall": sum(recall) / len(recall)}, predictions
