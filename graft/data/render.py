"""Text rendered as an image, for CLIPPO (Tschannen et al. 2023): one ViT reads pixels and "text".

Black text on a white square canvas, word-wrapped, in DejaVu Sans Mono — the font that ships
inside matplotlib, already a dependency — so rendering needs no download and is identical on
every machine. Drawn at 4x and downsampled (box filter) so small glyphs keep anti-aliased edges.
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_SUPERSAMPLE = 4


@functools.cache
def _font(px: int) -> ImageFont.FreeTypeFont:
    # lazy: matplotlib takes ~0.4 s to import
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"
    return ImageFont.truetype(str(path), px)


def render_text(text: str, size: int, font_size: int = 0) -> Image.Image:
    """`text` wrapped into lines on a (size, size) RGB canvas, font_size pixels per line.

    font_size 0 = size // 9: at 48 px, 9 lines of 15 characters, so the longest Shapes caption
    (4 objects, ~100 characters) fits in 8 lines, and a 5 px glyph still spans most of an 8 px
    patch. A larger font (size // 4 before) cut most multi-object captions after the first object.
    """
    px = (font_size or max(4, size // 9)) * _SUPERSAMPLE
    s = size * _SUPERSAMPLE
    font = _font(px)
    ascent, descent = font.getmetrics()
    img = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    per_line = max(1, int(s // max(1.0, font.getlength("m"))))  # monospace: every glyph is as wide
    y = 0
    for line in textwrap.wrap(text, per_line):  # a word longer than a line is broken, not drawn past the edge
        if y + ascent + descent > s:
            break  # text that does not fit is cut, as CLIPPO crops long texts
        draw.text((0, y), line, fill=(0, 0, 0), font=font)
        y += px
    return img.resize((size, size), Image.BOX)
