"""Text rendered as an image, for CLIPPO (Tschannen et al. 2023): one ViT reads pixels and "text".

Black text on a white square canvas, word-wrapped, in DejaVu Sans Mono — the font that ships
inside matplotlib, already a dependency — so rendering needs no download and is identical on
every machine. Drawn at 4x and downsampled (box filter) so small glyphs keep anti-aliased edges.
"""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_SUPERSAMPLE = 4


@functools.cache
def _font(px: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"
    return ImageFont.truetype(str(path), px)


def render_text(text: str, size: int, font_size: int = 0) -> Image.Image:
    """`text` wrapped into lines on a (size, size) RGB canvas; font_size 0 = fit ~4 lines."""
    px = (font_size or max(4, size // 4)) * _SUPERSAMPLE
    s = size * _SUPERSAMPLE
    font = _font(px)
    img = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    char_w = max(1.0, font.getlength("m"))
    per_line = max(1, int(s // char_w))
    y = 0
    for line in _wrap(text, per_line):
        if y + px > s:
            break  # text that does not fit is cut, as CLIPPO crops long texts
        draw.text((0, y), line, fill=(0, 0, 0), font=font)
        y += px
    return img.resize((size, size), Image.BOX)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if len(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])
