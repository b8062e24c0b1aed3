"""Decoding untrusted images: size judged from the header first, any mode to RGB, every failure named.

`open_image` decodes only an allow-list of formats (data.image_formats: never EPS, which Pillow
hands to Ghostscript), reads at most data.max_image_bytes, never decodes pixels before checking
width x height against a limit (decompression bombs), never changes PIL's global
`Image.MAX_IMAGE_PIXELS`, and never sets `ImageFile.LOAD_TRUNCATED_IMAGES`: a truncated file is an error, not a half-grey image.

Valid but unusual images are used, not skipped: CMYK, 16-bit greyscale, palette and alpha images
are converted to RGB (alpha composited onto black, 16-bit scaled to 8-bit), and the conversion kind
is reported so a data source can count it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from graft.data.limits import IMAGE_FORMATS
from graft.data.samples import BadSample

_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def conversion(img: Image.Image) -> str | None:
    """Which conversion an image needs before it is RGB: cmyk | 16bit | alpha | palette | None."""
    if img.mode == "CMYK":
        return "cmyk"
    if img.mode in _HIGH_DEPTH:
        return "16bit"
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        return "alpha"
    if img.mode == "P":
        return "palette"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: alpha is composited onto black, palettes and greyscale are expanded,
    16-bit greyscale is scaled to 8 bits (PIL's own convert would clip it to white)."""
    if img.mode in _HIGH_DEPTH:
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F" or a.max(initial=0) > 1.0:
            a = a / 257.0 if img.mode.startswith("I") else a
        else:
            a = a * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if conversion(img) == "alpha":
        img = img.convert("RGBA")
        base = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(base, img).convert("RGB")
    return img.convert("RGB")


def open_image(data: bytes | str | Path, max_pixels: int, formats=IMAGE_FORMATS,
               max_bytes: int = 32 << 20) -> tuple[Image.Image, str | None]:
    """Decode `data` (the file's bytes, or a path) into RGB; returns (image, conversion kind).

    Only the Pillow `formats` named are tried; a file over `max_bytes` is not read. Raises BadSample
    with reason image_not_found | image_empty | image_unreadable | image_too_large | image_truncated;
    whatever Pillow raises on the bytes becomes one of them (the record is bad, not the run).
    """
    if isinstance(data, (str, Path)):
        data = _read(Path(data), max_bytes)
    if len(data) == 0:
        raise BadSample("image_empty")
    if len(data) > max_bytes:
        raise BadSample("image_too_large", f"{len(data)} bytes > data.max_image_bytes={max_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own limit, hit before ours for giant headers
        raise BadSample("image_too_large", str(e)[:80]) from None
    except UnidentifiedImageError:
        raise BadSample("image_unreadable", f"not a {'/'.join(formats)} image (data.image_formats)") from None
    except Exception as e:  # a header Pillow chokes on, whatever the exception
        raise BadSample("image_unreadable", type(e).__name__) from None
    if img.width * img.height > max_pixels:
        raise BadSample("image_too_large", f"{img.width}x{img.height} > {max_pixels} pixels")
    try:
        img.load()  # the first frame of a GIF or a multi-page TIFF
        kind = conversion(img)
        return to_rgb(img), kind
    except Exception as e:  # truncated or corrupt pixel data, whatever the exception
        raise BadSample("image_truncated", f"{type(e).__name__}: {str(e)[:60]}") from None


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        if not path.is_file():  # also refuses devices and FIFOs, whose reads may never end
            raise BadSample("image_not_found", str(path))
        if path.stat().st_size > max_bytes:
            raise BadSample("image_too_large", f"{path.stat().st_size} bytes > data.max_image_bytes={max_bytes}")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)  # a file growing while read is still cut off
    except OSError as e:
        raise BadSample("image_not_found", f"{path}: {type(e).__name__}") from None


def open_within(data: bytes | str | Path | Image.Image, d) -> tuple[Image.Image, str | None]:
    """`open_image` with the data config's limits (data.max_image_pixels, .image_formats, .max_image_bytes).
    An image graft drew itself (the built-in world's, data/world_source.py) has no bytes to check."""
    if isinstance(data, Image.Image):
        return data, None
    return open_image(data, d.max_image_pixels, d.image_formats, d.max_image_bytes)
