"""A user's image–caption pairs, for retrieval: several captions per image allowed.

- **webdataset shards** (a folder of `*.tar`, one shard, or a brace pattern): records with an image
  and `KEY.txt` (one caption per line, as CLIP_benchmark's retrieval shards have) or `KEY.json`
  (`captions` list, or `caption`).
- **COCO captions JSON** (`captions_val2017.json` layout): `images` [{id, file_name}] and
  `annotations` [{image_id, caption}]; image files relative to `eval.image_root`, else the JSON's folder.
- **Karpathy split JSON** (`dataset_coco.json` / `dataset_flickr30k.json`): `images` [{filename,
  filepath?, split, sentences: [{raw}]}]; the `test` split is used.

JSON is parsed within the data limits (limits.py); image paths may not leave the image folder.
Images are decoded later with the training data's limits: a bad image is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft.data.limits import image_path, parse_json, read_document
from graft.data.samples import BadSample
from graft.data.skips import SkipLog, printable
from graft.data.tar import read_shard
from graft.errors import UserError
from graft.eval.labelled import SHARD_IMAGE_EXTS, image_folder, shard_urls


@dataclass
class CaptionedSet:
    name: str
    items: object  # a callable giving (id, image bytes | Path, [captions]) in order
    log: SkipLog


def load_captioned(path: str, cfg) -> CaptionedSet:
    p, d = Path(path), cfg.data
    if p.suffix == ".json" and p.is_file():
        return _json(p, d, image_folder(cfg, p))
    urls = shard_urls(path, "not a COCO / Karpathy captions .json, nor webdataset shards that exist")
    log, limits = SkipLog(), {**{e: d.max_image_bytes for e in SHARD_IMAGE_EXTS}, "txt": d.max_text_bytes,
                              "json": d.max_json_bytes}

    def items():
        for url in urls:
            for rec in read_shard(url, limits, log):
                key = f"{Path(url).name}:{rec['__key__']}"
                image = next((rec[e] for e in SHARD_IMAGE_EXTS if e in rec), None)
                try:
                    captions = _captions(rec, d)
                except BadSample as e:
                    log.skip(e.reason, key, e.detail)
                    continue
                if image is None or not captions:
                    log.skip("image_missing" if image is None else "text_missing", key)
                    continue
                yield key, image, captions

    return CaptionedSet(p.name, items, log)


def _captions(rec: dict, d) -> list[str]:
    """The record's captions (BadSample if its text cannot be read)."""
    if "txt" in rec:
        try:
            return [line.strip() for line in rec["txt"].decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise BadSample("text_not_utf8", ".txt") from None
    meta = parse_json(rec["json"], d, ".json") if "json" in rec else {}
    caps = meta.get("captions", [meta.get("caption")]) if isinstance(meta, dict) else []
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []


def _json(path: Path, d, root: Path) -> CaptionedSet:
    data = read_document(path, "--data")
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
