"""Data the data tests write themselves: the built-in world exported, and shards with every bad case."""

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from graft.cli import main
from graft.data.shapes import ShapesWorld

SMALL = ["--set", "train.progress=false", "--set", "eval.splits=", "--set", "train.log_every=1",
         "--set", "train.peak_flops=1e11", "--set", "train.batch_size=8"]


def export(fmt: str, out: Path, n: int, *extra: str) -> None:
    assert main(["data", "export-shapes", "--format", fmt, "--out", str(out), "--n", str(n), *extra]) == 0


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes: decoding it would fail,
    so it can only be rejected as too large if the size is judged from the header first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Evil:
    """Unpickling this writes a file: proof that a .pyd member was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def write_tar(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def good_records(prefix: str, n: int, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    world = ShapesWorld(image_size=24, grid=3)
    out = []
    for i in range(start, start + n):
        s = world.sample("train", i)
        out.append((f"{prefix}{i:05d}", {"png": encoded(s.image), "txt": s.caption.encode()}))
    return out


# every bad record case → the reason it must be counted under (one pass reads each once)
BAD_EXPECTED = {"image_truncated": 2, "image_unreadable": 1, "image_empty": 1, "image_too_large": 2,
                "text_missing": 1, "text_not_utf8": 1, "text_bad_json": 1, "image_missing": 1,
                "empty_answer": 1, "placeholder_mismatch": 1, "shard_missing": 1, "shard_corrupt": 1}
NOTES_EXPECTED = {"converted_cmyk": 1, "converted_16bit": 1, "converted_palette": 1, "converted_alpha": 1}


def bad_shards(root: Path, marker: Path, good: int = 24) -> tuple[str, int]:
    """Shards holding every bad case of issue 3; returns (brace pattern, usable records in one pass)."""
    root.mkdir(parents=True, exist_ok=True)
    img = ShapesWorld(image_size=24, grid=3).sample("train", 0).image
    png, cap = encoded(img), b"a large red circle"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    grey16 = Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16))
    bad = [
        ("trunc_png", {"png": png[: len(png) // 2], "txt": cap}),
        ("trunc_jpg", {"jpg": encoded(noise, "JPEG")[:3000], "txt": cap}),
        ("html", {"jpg": b"<!doctype html><html><body>404 not found</body></html>", "txt": cap}),
        ("zero", {"jpg": b"", "txt": cap}),
        ("bomb", {"png": png_header_only(50_000, 50_000), "txt": cap}),  # past PIL's own bomb limit
        ("huge", {"png": png_header_only(9_000, 9_000), "txt": cap}),  # 81 M > data.max_image_pixels
        ("nocap", {"png": png}),
        ("latin1", {"png": png, "txt": "café crème".encode("latin-1")}),
        ("badjson", {"png": png, "json": b"{'caption': not json"}),
        ("noimage", {"txt": cap, "json": b'{"caption": "a red circle"}'}),
        ("blank", {"png": png, "txt": b"   "}),
        ("marker", {"png": png, "json": b'{"conversations": [{"from": "human", "value": "<image> <image> q"}, '
                                        b'{"from": "gpt", "value": "a"}]}'}),  # two images' markers
        ("plain", {"png": png, "txt": b"a <image> inside a caption"}),  # usable: the marker is plain text
        ("pickle", {"png": png, "txt": cap, "pyd": pickle.dumps(Evil(marker))}),  # usable; .pyd never read
        ("cmyk", {"jpg": encoded(img.convert("CMYK"), "JPEG"), "txt": cap}),
        ("grey16", {"png": encoded(grey16), "txt": cap}),
        ("palette", {"png": encoded(img.convert("P")), "txt": cap}),
        ("alpha", {"png": encoded(img.convert("RGBA")), "txt": cap}),
    ]
    write_tar(root / "bad.tar", bad)
    write_tar(root / "trunc.tar", good_records("t", 5))
    with tarfile.open(root / "trunc.tar") as tf:  # cut inside record 3's image: records 0-2 survive
        cut = next(m for m in tf.getmembers() if m.name == "t00003.png").offset_data + 10
    (root / "trunc.tar").write_bytes((root / "trunc.tar").read_bytes()[:cut])
    write_tar(root / "good.tar", good_records("g", good))
    usable = 6 + 3 + good  # plain, pickle + 4 converted, 3 from the truncated tar, the good shard
    return f"{root}/{{bad,trunc,missing,good}}.tar", usable


def llava_json(path: Path, records: list) -> None:
    path.write_text(json.dumps(records))
