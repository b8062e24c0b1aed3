"""`data.source=series_shards`: webdataset tar shards of time series, `KEY.npy` + `KEY.cls`, `.txt` or `.json`.

The webdataset source (data/webdataset.py) with another item: a record's series is its `.npy`
member (numbered `KEY.0.npy`, `KEY.1.npy`, ... for several), an array (C, L) or (L, C) of at most
`data.max_image_bytes`, opened by the series processor without pickle (an object array or a header
that does not match its data is a skipped record, `series_bad`). Its text is `KEY.cls` (webdataset's
class-label member), the answer to `data.class_prompt`; without one, as for images: a `.json`
conversation, a `.txt` caption answering `data.caption_prompt`, or a `.json` caption. Shards, their
split across ranks and workers, the shuffle buffer and every kind of damage are the webdataset
source's.
"""

from __future__ import annotations

from graft.data.samples import BadSample
from graft.data.webdataset import ShardSource


class SeriesShards(ShardSource):
    EXTS = ("npy",)
    ITEM = "series"

    def __init__(self, pattern: str, index: int, cfg):
        super().__init__(pattern, index, cfg)
        self.limits["cls"] = cfg.max_text_bytes

    def _text(self, raw: dict):
        if "cls" not in raw:
            return super()._text(raw)
        try:
            label = raw["cls"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("text_not_utf8", ".cls") from None
        return {"conversations": [{"from": "human", "value": self.cfg.class_prompt}, {"from": "gpt", "value": label}]}
