"""The `restyled` split: the test scenes, drawn by a second renderer with sizes, offsets and shades varied."""

import numpy as np
import pytest

from graft.config_checks import apply_overrides
from graft.data.restyle import RESTYLED, SIZE_RANGE, RestyledWorld
from graft.data.shapes import COLORS
from graft.errors import UserError
from graft.recipes import shapes_vqa


def test_same_scenes_and_questions_as_test_other_pixels_deterministic():
    w = RestyledWorld(image_size=24, grid=3, seed=0)
    differ = 0
    for i in range(20):
        test, restyled = w.sample("test", i), w.sample(RESTYLED, i)
        assert (restyled.qa, restyled.caption, restyled.objects) == (test.qa, test.caption, test.objects)
        assert w.text(RESTYLED, i) == w.text("test", i)
        again = RestyledWorld(image_size=24, grid=3, seed=0).sample(RESTYLED, i)
        assert np.array_equal(np.asarray(again.image), np.asarray(restyled.image))
        differ += not np.array_equal(np.asarray(test.image), np.asarray(restyled.image))
    assert differ == 20


def _object_box(img: np.ndarray, background: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.abs(img.astype(int) - background).sum(-1) > 0)
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_one_object_stays_in_its_cell_with_its_size_and_colour():
    """At 96 px on a 3x3 board (32 px cells): the object's box lies inside its cell, spans the
    size range its word names, and its colour is a shade of the named colour."""
    w, cell = RestyledWorld(image_size=96, grid=3, seed=0), 32
    seen = set()
    for i in range(300):
        s = w.sample(RESTYLED, i)
        if len(s.objects) != 1 or s.objects[0].shape != "square":  # a square's box is its extent
            continue
        o, img = s.objects[0], np.asarray(s.image)
        y0, y1, x0, x1 = _object_box(img, img[0, 0] if o.row or o.col else img[-1, -1])
        assert o.row * cell <= y0 and y1 < (o.row + 1) * cell and o.col * cell <= x0 and x1 < (o.col + 1) * cell
        lo, hi = SIZE_RANGE[o.size]
        assert lo * cell - 2 <= x1 - x0 + 1 <= hi * cell + 2, (o, x1 - x0 + 1)
        centre = img[(y0 + y1) // 2, (x0 + x1) // 2].astype(float)
        ratio = centre / np.maximum(COLORS[o.color], 1)
        assert ((ratio > 0.8) & (ratio < 1.15) | (centre >= 254)).all(), (o.color, centre)
        seen.add(o.size)
        if len(seen) == 2 and i > 100:
            break
    assert seen == {"small", "large"}


def test_restyled_is_an_evaluation_split_only():
    cfg = apply_overrides(shapes_vqa(), ["eval.splits=[test, restyled]"])
    assert cfg.eval.splits == ["test", "restyled"]
    with pytest.raises(ValueError, match="unknown split"):
        RestyledWorld().sample("restyledd", 0)
    with pytest.raises(UserError, match="eval.splits: unknown split 'restyle'"):
        apply_overrides(shapes_vqa(), ["eval.splits=[restyle]"])
