"""A Hugging Face `datasets` dataset saved with `save_to_disk`: image and text columns named in the config.

`data.path` is the folder; a DatasetDict uses its `train` split. `data.image_column` holds an image
(an `Image` feature, bytes, or a path relative to `data.image_root`) or a list of them (e.g. an
`images` column of `List(Image())`, at most `data.max_images`; the conversation's `<image>` markers
place them); `data.text_column` holds a caption string or a conversation (a list of `{"from",
"value"}` or `{"role", "content"}` messages). Images are read undecoded (`Image(decode=False)`) so
that graft checks their size from the header before decoding, like every other source; a path in
the image column may not leave `data.image_root`.
"""

from __future__ import annotations

from pathlib import Path

from graft.config import DataConfig
from graft.data.indexed import IndexedSource
from graft.data.limits import image_path
from graft.data.samples import (
    BadSample,
    Example,
    check_image_count,
    make_example,
    text_turns,
)
from graft.errors import UserError


def load_dataset_dir(path: str, split: str = "train"):
    # lazy: datasets takes ~0.6 s to import
    import datasets

    if not Path(path, "dataset_info.json").is_file() and not Path(path, "dataset_dict.json").is_file():
        raise UserError(f"data.path: {path} is not a folder written by datasets' save_to_disk")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"data.path: {path} has splits {', '.join(ds)}, no '{split}'")
        ds = ds[split]
    return ds


class HFSource(IndexedSource):
    def __init__(self, cfg: DataConfig):
        # lazy: datasets takes ~0.6 s to import
        import datasets

        if not cfg.path:
            raise UserError("data.source=hf needs data.path (a folder written by save_to_disk)")
        ds = load_dataset_dir(cfg.path)
        for key, column in (("data.image_column", cfg.image_column), ("data.text_column", cfg.text_column)):
            if column not in ds.column_names:
                raise UserError(f"{key}={column!r} is not a column of {cfg.path} (columns: {', '.join(ds.column_names)})")
        feature = ds.features[cfg.image_column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.List(datasets.Image(decode=False)))
        self.ds, self.cfg = ds, cfg
        self.name, self.seed = Path(cfg.path).name, cfg.seed
        self.root = Path(cfg.image_root or cfg.path)

    def __len__(self) -> int:
        return len(self.ds)

    def example(self, raw: int) -> Example:
        row = self.ds[raw]
        image, text = row[self.cfg.image_column], row[self.cfg.text_column]
        images = image if isinstance(image, list) else [image]
        check_image_count(len(images), self.cfg.max_images)
        images = [self._image(im) for im in images]
        if not images:
            raise BadSample("image_missing", f"{self.cfg.image_column} is an empty list")
        return make_example(self.key(raw), images, text_turns(text, self.cfg.caption_prompt))

    def _image(self, image) -> bytes | Path:
        if isinstance(image, dict):  # an Image feature read undecoded: {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            image = image_path(self.root, image)
        if not isinstance(image, (bytes, Path)):
            raise BadSample("image_missing", f"{self.cfg.image_column} is {type(image).__name__}")
        return image
