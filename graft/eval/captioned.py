"""A user's image–caption pairs, for retrieval: several captions per image allowed.

- **webdataset shards** (a folder of `*.tar`, one shard, or a brace pattern): records with an image
  and `KEY.txt` (one caption per line, as CLIP_benchmark's retrieval shards have) or `KEY.json`
  (`captions` list, or `caption`).
- **COCO captions JSON** (`captions_val2017.json` layout): `images` [{id, file_name}] and
  `annotations` [{image_id, caption}]; image files relative to `data.image_root`, else the JSON's folder.
- **Karpathy split JSON** (`dataset_coco.json` / `dataset_flickr30k.json`): `images` [{filename,
  filepath?, split, sentences: [{raw}]}]; the `test` split is used.

JSON is parsed within the data limits (limits.py); image paths may not leave the image folder.
Images are decoded later with the training data's limits: a bad image is skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from graft.data.limits import image_path
from graft.data.samples import BadSample
from graft.data.skips import SkipLog, printable
from graft.data.tar import read_shard
from graft.errors import UserError
from graft.eval.labelled import SHARD_IMAGE_EXTS


@dataclass
class CaptionedSet:
    name: str
    items: object  # a callable giving (id, image bytes | Path, [captions]) in order
    log: SkipLog


def load_captioned(path: str, d) -> CaptionedSet:
    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        return _json(p, d)
    urls = sorted(str(u) for u in p.glob("*.tar")) if p.is_dir() else expand_urls(path)
    if not urls or not all(Path(u).is_file() for u in urls):
        raise UserError(f"--data {path}: not a COCO / Karpathy captions .json, nor webdataset shards that exist")
    log, limits = SkipLog(), {**{e: d.max_image_bytes for e in SHARD_IMAGE_EXTS}, "txt": d.max_text_bytes,
                              "json": d.max_json_bytes}

    def items():
        for url in urls:
            for rec in read_shard(url, limits, log):
                key = f"{Path(url).name}:{rec['__key__']}"
                image = next((rec[e] for e in SHARD_IMAGE_EXTS if e in rec), None)
                captions = _captions(rec)
                if image is None or not captions:
                    log.skip("image_missing" if image is None else "text_missing", key)
                    continue
                yield key, image, captions

    return CaptionedSet(p.name, items, log)


def _captions(rec: dict) -> list[str]:
    try:
        if "txt" in rec:
            return [line.strip() for line in rec["txt"].decode("utf-8").splitlines() if line.strip()]
        meta = json.loads(rec["json"]) if "json" in rec else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        return []
    caps = meta.get("captions", [meta.get("caption")]) if isinstance(meta, dict) else []
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []


def _json(path: Path, d) -> CaptionedSet:
    try:  # one document: if it does not parse, the file is refused in one line
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"--data {path} is not valid JSON ({type(e).__name__})") from None
    root = Path(d.image_root) if d.image_root else path.parent
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"--data {path}: expected an object with an `images` list (COCO or Karpathy layout)")
    if "annotations" in data:
        pairs = _coco(data, path)
    else:
        pairs = [(str(im.get("filename")), str(Path(im.get("filepath", "")) / str(im.get("filename"))),
                  [s.get("raw", "") for s in im.get("sentences", []) if isinstance(s, dict)])
                 for im in data["images"] if isinstance(im, dict) and im.get("split", "test") == "test"]
    log = SkipLog()

    def items():
        for key, name, captions in pairs:
            try:
                file = image_path(root, name)
            except BadSample as e:
                log.skip(e.reason, key, e.detail)
                continue
            captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
            if not captions:
                log.skip("text_missing", key, "no caption")
                continue
            yield key, file, captions

    if not pairs:
        raise UserError(f"--data {path}: no images (Karpathy layout: none with split 'test')")
    return CaptionedSet(path.name, items, log)


def _coco(data: dict, path: Path) -> list[tuple[str, str, list[str]]]:
    files = {im.get("id"): im.get("file_name") for im in data["images"] if isinstance(im, dict)}
    captions: dict = {i: [] for i in files}
    for n, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in captions:
            raise UserError(f"{path}: annotation {n} names image_id {printable(str(image_id))}, "
                            "which is not in `images`")
        captions[image_id].append(ann.get("caption", ""))
    return [(str(i), str(files[i]), caps) for i, caps in captions.items()]
