"""A user's labelled images, for zero-shot classification: a folder per class, or CLIP_benchmark shards.

- **Folder per class** (ImageNet layout): `PATH/<class name>/*.jpg|jpeg|png|webp|bmp|gif|tif|tiff`;
  the classes are the sub-folder names in sorted order.
- **CLIP_benchmark webdataset layout**: `PATH` is a folder of `*.tar` shards (or one shard, or a
  brace pattern) whose records hold an image and `KEY.cls` (the class index), with
  `classnames.txt` (one name per line, line i = class i) and, optionally,
  `zeroshot_classification_templates.txt` (one template with `{c}` or `{}` per line) beside them.

Images are decoded later, through the same limits as training data (data/images.py): a bad image
is skipped and counted, never a crash. A label that is not a class index is the data set's error
(one line naming the file and the record), since it means the class list does not fit the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from graft.data.skips import SkipLog, printable
from graft.data.tar import read_shard
from graft.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class LabelledSet:
    name: str
    classes: list[str]
    templates: list[str] | None  # the data set's own, if it ships them
    items: object  # a callable giving (id, image bytes | Path | None, label) in order
    log: SkipLog  # records skipped while listing (e.g. no image, no .cls)


def load_labelled(path: str, cfg) -> LabelledSet:
    p = Path(path)
    if p.is_dir() and not list(p.glob("*.tar")) and any(q.is_dir() for q in p.iterdir()):
        return _folders(p)
    return _shards(path, cfg.data.max_image_bytes)


def _folders(root: Path) -> LabelledSet:
    classes = sorted(q.name for q in root.iterdir() if q.is_dir())
    files = [(f"{c}/{f.name}", f, i) for i, c in enumerate(classes)
             for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"--data {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return LabelledSet(root.name, classes, None, lambda: iter(files), SkipLog())


def _shards(pattern: str, max_image_bytes: int) -> LabelledSet:
    p = Path(pattern)
    urls = shard_urls(pattern, "not a folder of class folders, nor webdataset shards that exist")
    folder = p if p.is_dir() else Path(urls[0]).parent
    names = folder / "classnames.txt"
    if not names.is_file():
        raise UserError(f"--data {pattern}: {names} not found (CLIP_benchmark layout: one class name per line)")
    classes = [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classes:
        raise UserError(f"{names}: no class names")
    templates_file = folder / "zeroshot_classification_templates.txt"
    templates = None
    if templates_file.is_file():
        lines = templates_file.read_text(encoding="utf-8").splitlines()
        templates = [t.strip().replace("{c}", "{}") for t in lines if t.strip()]
    log, limits = SkipLog(), {**{e: max_image_bytes for e in SHARD_IMAGE_EXTS}, "cls": 64}

    def items():
        for url in urls:
            for rec in read_shard(url, limits, log):
                key = f"{Path(url).name}:{rec['__key__']}"
                image = next((rec[e] for e in SHARD_IMAGE_EXTS if e in rec), None)
                if image is None or "cls" not in rec:
                    log.skip("image_missing" if image is None else "text_missing", key, "no image / no .cls")
                    continue
                yield key, image, _label(rec["cls"], len(classes), url, key)

    return LabelledSet(folder.name, classes, templates, items, log)


def image_folder(cfg, data_file: Path) -> Path:
    """Where the image files a task's JSON / TSV names live: `eval.image_root`, else beside the file."""
    return Path(cfg.eval.image_root) if cfg.eval.image_root else data_file.parent


def shard_urls(path: str, what: str) -> list[str]:
    """The shards `--data` names: a folder's `*.tar`, or a path / brace pattern; each must exist."""
    p = Path(path)
    urls = sorted(str(u) for u in p.glob("*.tar")) if p.is_dir() else expand_urls(path)
    if not urls or not all(Path(u).is_file() for u in urls):
        raise UserError(f"--data {path}: {what}")
    return urls


def _label(raw: bytes, n: int, url: str, key: str) -> int:
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        label = -1
    if not 0 <= label < n:
        raise UserError(f"{url}: record {printable(key)} has label {printable(raw[:20].decode('latin-1'))!r}, "
                        f"not a class index 0..{n - 1} of classnames.txt")
    return label
