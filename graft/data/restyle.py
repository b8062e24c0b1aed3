"""The Shapes world's test scenes drawn by a second, independent renderer: the `restyled` split.

A model that learned the world's concepts should answer a scene drawn in the world's style but
not by its renderer about as well as the world's own test split; one that learned the renderer's
exact pixels will not. `restyled` sample i has the objects, questions and caption of `test`
sample i, drawn here in numpy (not with PIL's ImageDraw as `ShapesWorld.render` does), and varied
within what the world's words still name unambiguously:

- sizes between the world's two: a small object spans 0.55-0.675 of its cell and a large one
  0.775-0.9 (the world draws exactly 0.55 and 0.9), so each stays on its own side of the midpoint;
- small offsets: the object's centre moves by up to 40 % of its cell's free margin in x and y,
  so it stays inside its cell (the cell is the position the questions ask about);
- other shades of the same colours: each channel of the object's colour scaled by 0.85-1.1
  (clipped to 255), and a background shade of 15-75 (the world: 20-70).

Coverage is computed on a grid 4x finer than the image and averaged down, like the world's own
anti-aliasing, from each shape's own geometry. The variations are a pure function of (world
seed, index), so the split is as deterministic as the others.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from graft.data.shapes import COLORS, Obj, Sample, ShapesWorld

RESTYLED = "restyled"
SOURCE_SPLIT = "test"  # whose scenes and questions `restyled` draws anew
SIZE_RANGE = {"small": (0.55, 0.675), "large": (0.775, 0.9)}  # fraction of the cell the object spans
OFFSET = 0.4  # largest move of the centre, as a fraction of the cell's free margin on each side
SHADE = (0.85, 1.1)  # per-channel colour scale
BACKGROUND = (15, 75)
_FINE = 4


class RestyledWorld(ShapesWorld):
    """A ShapesWorld that also answers the `restyled` split (see the module docstring)."""

    def sample(self, split: str, index: int) -> Sample:
        if split != RESTYLED:
            return super().sample(split, index)
        s = super().sample(SOURCE_SPLIT, index)
        rng = random.Random(f"restyled/{self.seed}/{index}")
        return Sample(draw(s.objects, self.image_size, self.grid, rng), s.caption, s.qa, s.label, s.objects)

    def text(self, split: str, index: int):
        return super().text(SOURCE_SPLIT if split == RESTYLED else split, index)


def draw(objects: list[Obj], image_size: int, grid: int, rng: random.Random) -> Image.Image:
    """`objects` on a board of `grid` x `grid` cells, with sizes, offsets and shades drawn from `rng`."""
    n = image_size * _FINE
    cell = n / grid
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5  # pixel centres on the fine grid
    img = np.full((n, n, 3), rng.randint(*BACKGROUND), np.float32)
    for o in objects:
        extent = cell * rng.uniform(*SIZE_RANGE[o.size])
        margin = (cell - extent) / 2
        cx = (o.col + 0.5) * cell + rng.uniform(-OFFSET, OFFSET) * margin
        cy = (o.row + 0.5) * cell + rng.uniform(-OFFSET, OFFSET) * margin
        # coordinates relative to the object's box, in [-1, 1] inside it
        u, v = (xs - cx) / (extent / 2), (ys - cy) / (extent / 2)
        mask = _shape_mask(o.shape, u, v)
        color = np.minimum(np.array(COLORS[o.color], np.float32) * [rng.uniform(*SHADE) for _ in range(3)], 255)
        img[mask] = color
    small = img.reshape(image_size, _FINE, image_size, _FINE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.rint(small).astype(np.uint8), "RGB")


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fine-grid pixels inside `shape` drawn in the box [-1, 1]^2 (v grows downwards)."""
    inside_box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return inside_box
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return inside_box & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":  # two bars a third of the box wide
        return inside_box & ((np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3))
    raise ValueError(f"unknown shape {shape!r}")
