"""The built-in Shapes world: an infinite, deterministic source of image–text data, no download.

Each image is a `grid x grid` board of cells on a plain dark background holding 1..max_objects
objects, each with a shape, a colour, a size and a cell (its position). Sample `index` of `split`
is a pure function of (seed, split, index). Every sample carries

- a caption listing the objects in reading order ("a large red circle and a small blue square"),
- one question–answer pair per question type the scene allows (see `QUESTION_TYPES`),
- a class label (colour x shape of the first object) for zero-shot classification.

Splits: train / val / test draw from the same distribution and never contain the four held-out
colour–shape pairs in `HELD_OUT`; the `compositional` split puts one held-out pair in every image
and asks about it, so it measures generalisation to unseen attribute combinations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from graft.config import CAPTION_PROMPT  # noqa: F401 (re-exported: the world asks it)

SPLITS = ("train", "val", "test", "compositional")
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (50, 100, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 70, 200),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
HELD_OUT = frozenset({("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")})
QUESTION_TYPES = ("color", "shape", "size", "count", "exist", "spatial")
RELATIONS = ("left of", "right of", "above", "below")
CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]  # class label = index into this list
_SUPERSAMPLE = 4  # draw at 4x and downsample, so small shapes keep anti-aliased edges


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class QA:
    question: str
    answer: str
    kind: str  # one of QUESTION_TYPES


@dataclass
class Sample:
    image: Image.Image
    caption: str
    qa: list[QA]
    label: int
    objects: list[Obj] = field(default_factory=list)

    def question(self, kind: str) -> QA | None:
        return next((q for q in self.qa if q.kind == kind), None)


class ShapesWorld:
    def __init__(self, image_size: int = 32, grid: int = 4, max_objects: int = 4, seed: int = 0):
        if max_objects > grid * grid:
            raise ValueError(f"max_objects={max_objects} does not fit a {grid}x{grid} grid")
        self.image_size, self.grid, self.max_objects, self.seed = image_size, grid, max_objects, seed

    def sample(self, split: str, index: int) -> Sample:
        objects, background, qa = self._content(split, index)
        return Sample(self.render(objects, background), caption(objects), qa, CLASSES.index(objects[0].name), objects)

    def text(self, split: str, index: int) -> tuple[str, list[QA]]:
        """Sample `index`'s caption and questions, without drawing its image (a tokenizer's corpus)."""
        objects, _, qa = self._content(split, index)
        return caption(objects), qa

    def _content(self, split: str, index: int) -> tuple[list[Obj], int, list[QA]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        rng = random.Random(f"shapes/{self.seed}/{split}/{index}")
        objects, background = self._scene(rng, novel=split == "compositional")
        focus = objects[0] if split == "compositional" else None  # ask about the unseen pair
        qa = [q for kind in QUESTION_TYPES if (q := _question(kind, objects, rng, focus)) is not None]
        return objects, background, qa

    def _scene(self, rng: random.Random, novel: bool) -> tuple[list[Obj], int]:
        n = rng.randint(1, self.max_objects)
        cells = rng.sample(range(self.grid * self.grid), n)
        objects = []
        for i, cell in enumerate(cells):
            while True:  # only the first object of a compositional scene is a held-out pair
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                if ((color, shape) in HELD_OUT) == (novel and i == 0):
                    break
            objects.append(Obj(shape, color, rng.choice(SIZES), cell // self.grid, cell % self.grid))
        return objects, rng.randint(20, 70)

    def render(self, objects: list[Obj], background: int = 40) -> Image.Image:
        s = self.image_size * _SUPERSAMPLE
        cell = s / self.grid
        img = Image.new("RGB", (s, s), (background,) * 3)
        draw = ImageDraw.Draw(img)
        for o in objects:
            extent = cell * (0.9 if o.size == "large" else 0.55)
            # Position inside the cell is fixed by the object, not random: the cell *is* the position.
            x0 = o.col * cell + (cell - extent) / 2
            y0 = o.row * cell + (cell - extent) / 2
            _draw_shape(draw, o.shape, (x0, y0, x0 + extent, y0 + extent), COLORS[o.color])
        return img.resize((self.image_size, self.image_size), Image.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        t = (x1 - x0) / 3
        draw.rectangle((x0 + t, y0, x1 - t, y1), fill=color)
        draw.rectangle((x0, y0 + t, x1, y1 - t), fill=color)


def caption(objects: list[Obj]) -> str:
    """Objects in reading order (row, then column)."""
    parts = [f"a {o.size} {o.color} {o.shape}" for o in sorted(objects, key=lambda o: (o.row, o.col))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _unique(objects: list[Obj], key) -> list[Obj]:
    return [o for o in objects if sum(key(p) == key(o) for p in objects) == 1]


def _pick(candidates: list[Obj], rng: random.Random, focus: Obj | None) -> Obj | None:
    if not candidates:
        return None
    return focus if focus in candidates else rng.choice(candidates)


def _question(kind: str, objects: list[Obj], rng: random.Random, focus: Obj | None) -> QA | None:
    """One question of `kind` about the scene, or None when the scene cannot pose one unambiguously."""
    if kind == "color":
        o = _pick(_unique(objects, lambda o: o.shape), rng, focus)
        return o and QA(f"what color is the {o.shape}?", o.color, kind)
    if kind == "shape":
        o = _pick(_unique(objects, lambda o: o.color), rng, focus)
        return o and QA(f"what shape is the {o.color} object?", o.shape, kind)
    if kind == "size":
        o = _pick(_unique(objects, lambda o: o.name), rng, focus)
        return o and QA(f"what size is the {o.name}?", o.size, kind)
    if kind == "count":
        what = rng.choice(("objects", "color", "shape"))
        if what == "objects":
            return QA("how many objects are there?", str(len(objects)), kind)
        if what == "color":
            c = rng.choice([o.color for o in objects] + list(COLORS))
            return QA(f"how many {c} objects are there?", str(sum(o.color == c for o in objects)), kind)
        s = rng.choice([o.shape for o in objects] + list(SHAPES))
        return QA(f"how many {s}s are there?", str(sum(o.shape == s for o in objects)), kind)
    if kind == "exist":
        if rng.random() < 0.5:
            o = focus or rng.choice(objects)
            return QA(f"is there a {o.name}?", "yes", kind)
        # Absent pairs come from the scene's own distribution: held-out ones only when focused on one.
        present = {o.name for o in objects}
        absent = [f"{c} {s}" for c in COLORS for s in SHAPES
                  if f"{c} {s}" not in present and ((c, s) in HELD_OUT) == (focus is not None)]
        return QA(f"is there a {rng.choice(absent)}?", "no", kind)
    if kind == "spatial":
        named = _unique(objects, lambda o: o.name)
        if len(named) < 2:
            return None
        a = _pick(named, rng, focus)
        b = rng.choice([o for o in named if o is not a])
        truth = {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}
        want = rng.random() < 0.5
        options = [r for r in RELATIONS if truth[r] == want] or list(RELATIONS)
        rel = rng.choice(options)
        return QA(f"is the {a.name} {rel} the {b.name}?", "yes" if truth[rel] else "no", kind)
    raise ValueError(f"unknown question type {kind!r}")
