"""What each image token's cell holds: the cell head's targets (`data.cell_targets`; docs/spatial.md).

In the built-in world a grid cell is one patch, and with a per-patch connector one image token. A
question keyed by shape ("what color is the triangle?", "how many triangles are there?") is
answered only if attention can find the tokens whose cell holds that shape, and a key is a linear
map of the token: colour, which is linear in the pixels, becomes a key unaided; shape does not
(docs/spatial.md). The training-only head (models/cell_head.py) asks every image token, as the LM
receives it, for its cell's shape, colour and size (class 0: an empty cell), row and column, so
that each is there to be read linearly. Measured: colour questions 0.88 -> 1.00 on the validation
split, but `shapes_spatial` then no longer learns spatial relations: not in the demo.

`cell_classes` gives one image's targets, cell by cell in row-major order (the order of its patches
and placeholders); `cell_targets` places them at the placeholders of a conversation's kept images.
"""

from __future__ import annotations

from graft.data.shapes import COLORS, SHAPES, SIZES, Sample

def classes(grid: int) -> tuple[int, ...]:
    """Classes per attribute: shape, colour, size (0 = empty cell), row, column."""
    return 1 + len(SHAPES), 1 + len(COLORS), 1 + len(SIZES), grid, grid


def cell_classes(sample: Sample, grid: int) -> list[tuple[int, ...]]:
    """(shape, colour, size, row, column) class of each of the grid's cells, row by row."""
    cells = [(0, 0, 0, i // grid, i % grid) for i in range(grid * grid)]
    for o in sample.objects:
        cells[o.row * grid + o.col] = (1 + SHAPES.index(o.shape), 1 + list(COLORS).index(o.color),
                                       1 + SIZES.index(o.size), o.row, o.col)
    return cells


def cell_targets(ids: list[int], placeholder: int, cells: list[list[tuple[int, ...]]]) -> list[tuple]:
    """(position, shape, colour, size, row, column) at each placeholder of the images `cells` describes (the
    conversation's kept images, in order): image k's j-th placeholder is its cell j."""
    at = [i for i, t in enumerate(ids) if t == placeholder]
    classes = [c for image in cells for c in image]
    if len(at) != len(classes):
        raise ValueError(f"{len(at)} image placeholders for {len(classes)} cells: the cell head needs one token per cell")
    return [(i, *c) for i, c in zip(at, classes)]
