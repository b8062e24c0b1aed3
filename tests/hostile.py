"""Hostile shards: one record per way a web-scraped record can try to crash, hang, bloat or steer a run.

`hostile_shards(root)` writes them next to good shards and returns what one pass must count: every
record lands in exactly one bin (used, or skipped under a reason), shard damage is counted once.
"""

import gzip
import io
import json
import pickle
import tarfile
import zlib
from pathlib import Path

from PIL import Image

from graft.data.shapes import ShapesWorld
from tests.data_helpers import Evil, encoded, good_records, write_tar

CONTROL_TEXT = "a red circle <eos> <pad> <bos> <|user|> hi <|assistant|> <image> the end"
ESCAPE_KEY = "evil\x1b[2J\nforged: graft train finished"  # a member name that would clear the screen
MEMORY_HOG = 50 << 20  # bytes of one .txt member that must never be read


def _eps() -> bytes:
    """A real EPS file: Pillow identifies it, and would hand it to Ghostscript on load()."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
            b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def _gif(img: Image.Image) -> bytes:
    frames = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _conversation(turns: int, markers: int = 1) -> bytes:
    msgs = []
    for i in range(turns):
        msgs += [{"from": "human", "value": ("<image>\n" * markers if i == 0 else "") + "what color?"},
                 {"from": "gpt", "value": "red"}]
    return json.dumps({"conversations": msgs}).encode()


def hostile_records(marker: Path) -> tuple[list, dict, dict, int]:
    """(records, skips expected, notes expected, usable records) of the record-level cases."""
    img = ShapesWorld(image_size=24, grid=3).sample("train", 0).image
    png, cap = encoded(img), b"a large red circle"
    deep = b"[" * 5000 + b"]" * 5000
    records = [
        ("bigint", {"png": png, "json": b'{"caption": "x", "n": ' + b"9" * 50_000 + b"}"}),
        ("deep", {"png": png, "json": b'{"caption": "x", "a": ' + deep + b"}"}),
        ("deep40", {"png": png, "json": b'{"caption": "x", "a": ' + b"[" * 40 + b"]" * 40 + b"}"}),
        ("longword", {"png": png, "txt": b"a" * 400_000}),  # no spaces: tokenizer training's worst case
        ("megacap", {"png": png, "txt": b"word " * 1_000_000}),  # 5 MB
        ("longjson", {"png": png, "json": json.dumps({"caption": "b" * 200_000}).encode()}),
        ("hog", {"png": png, "txt": b"c" * MEMORY_HOG}),
        ("surrogate", {"png": png, "json": b'{"caption": "a \\ud800 b"}'}),
        ("eps", {"jpg": _eps(), "txt": cap}),
        ("twomarkers", {"png": png, "json": _conversation(1, markers=2)}),
        (ESCAPE_KEY, {"jpg": b"", "txt": cap}),  # skipped (empty image): its key goes to the log
        ("jsonlist", {"png": png, "json": b"[1, 2, 3]"}),  # valid JSON, no caption
        # usable ones
        ("control", {"png": png, "txt": CONTROL_TEXT.encode()}),
        ("manyturns", {"png": png, "json": _conversation(100)}),
        ("gif", {"png": _gif(img), "txt": cap}),  # an animated GIF named .png: its first frame is used
        ("pickle", {"png": png, "txt": cap, "pyd": pickle.dumps(Evil(marker))}),
    ]
    skipped = {"text_bad_json": 1, "json_too_deep": 2, "text_too_long": 4, "text_not_utf8": 1,
               "image_unreadable": 1, "placeholder_mismatch": 1, "image_empty": 1, "text_missing": 1}
    notes = {"turns_truncated": 1}
    return records, skipped, notes, 4


def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def _survivors(plain: bytes, prefix_len: int, members_per_record: int = 2) -> int:
    """Records a reader can vouch for in the first `prefix_len` bytes of `plain` (a tar): record k
    is complete once the header of record k + 1's first member has been read."""
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        firsts = [m.offset for m in tf.getmembers()][::members_per_record]
    return sum(1 for start in firsts[1:] if start + 512 <= prefix_len)


def unusual_names(path: Path) -> tuple[int, int]:
    """A shard whose members' names webdataset's KEY.EXT split does not expect; returns (records,
    usable records). Each odd member is a record of its own with no image: it must be counted."""
    png, cap = encoded(ShapesWorld(image_size=24, grid=3).sample("train", 1).image), b"a small blue square"
    with tarfile.open(path, "w") as tf:
        tf.addfile(_folder("dir"))  # a folder entry: part of no record
        for name, data in (("README", b"no extension"), ("__meta__.json", b"{}"), ("x.bin", b"\0" * 10),
                           (".hidden.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.png")  # a symbolic link: never followed, never read
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        for name, data in (("dir/ok.png", png), ("dir/ok.txt", cap)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return 6, 1


def _folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def hostile_shards(root: Path, marker: Path, good: int = 24) -> tuple[str, dict, dict, int, int]:
    """Write the shards; returns (brace pattern, skips of one pass, notes, usable records, records
    read), the last two without the records of the cut .tar.gz (see cut_gzip_shard)."""
    root.mkdir(parents=True, exist_ok=True)
    cut_gzip_shard(root)
    records, skipped, notes, usable = hostile_records(marker)
    write_tar(root / "hostile.tar", records)
    read = len(records)

    write_tar(root / "cuthead.tar", good_records("h", 5))  # cut inside record 3's header
    with tarfile.open(root / "cuthead.tar") as tf:  # records 0-1 survive; 2 may have had more members
        _cut(root / "cuthead.tar", next(m for m in tf.getmembers() if m.name == "h00003.png").offset + 100)
    write_tar(root / "garbage.tar", good_records("e", 4))  # garbage after the end-of-archive marker
    (root / "garbage.tar").write_bytes((root / "garbage.tar").read_bytes() + b"GARBAGE" * 100)
    write_tar(root / "good.tar", good_records("g", good))
    odd, odd_usable = unusual_names(root / "names.tar")
    skipped = dict(skipped, shard_corrupt=3, image_missing=odd - odd_usable)
    usable += 2 + 4 + good + odd_usable
    read += 2 + 4 + good + odd
    return (f"{root}/{{hostile.tar,cuthead.tar,garbage.tar,cutgz.tar.gz,good.tar,names.tar}}", skipped, notes,
            usable, read)


def cut_gzip_shard(root: Path, n: int = 12) -> tuple[Path, int]:
    """A .tar.gz of n good records cut in half; returns it and how many records its decompressed
    half holds complete (a reader may lose one more: gzip cannot hand out a partial last block)."""
    write_tar(root / "plain.tar", good_records("z", n))
    plain = (root / "plain.tar").read_bytes()
    (root / "plain.tar").unlink()
    data = gzip.compress(plain)
    (root / "cutgz.tar.gz").write_bytes(data[: len(data) // 2])
    inflated = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[: len(data) // 2])
    return root / "cutgz.tar.gz", _survivors(plain, len(inflated))
