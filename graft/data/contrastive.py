"""Image–text pairs for contrastive training: which text goes with an image, how it is encoded,
from any source, through the same pipeline as the VLM's (`streaming.read_record`, via
`text_row`/`row`/`collate`): the records' images and captions (the built-in world's samples with
their captions: data/world_source.py).

The text paired with a Shapes image is its caption, which names every object with its size,
colour and shape in reading order ("a small red circle and a large blue square").
"""

from __future__ import annotations

import torch

from graft.data.processor import Processor
from graft.data.render import render_text
from graft.data.samples import BadSample
from graft.data.series_processor import SeriesProcessor
from graft.data.shapes import Sample
from graft.models.series import SeriesConfig


def pair_text(sample: Sample) -> str:
    return sample.caption


class ContrastiveProcessor(Processor):
    """Pixels as for the VLM; texts as fixed-length ids (ending in <eos>, then <pad>) or, for a
    shared tower (CLIPPO), as rendered images."""

    reads_captions = True  # a record's text is its caption (data/world_source.py gives the world's)

    def __init__(self, tokenizer, image_size: int, text_len: int, render: bool = False, font_size: int = 0):
        super().__init__(tokenizer, image_size, num_image_tokens=0, max_seq_len=text_len)
        self.render, self.font_size = render, font_size

    def text_ids(self, text: str) -> list[int]:
        return self._fixed(self._ids(text))

    def _ids(self, text: str) -> list[int]:
        """A text's ids before <eos> and padding (CoCa's processor starts them with <bos>)."""
        return self.tok.encode(text)

    def _fixed(self, ids: list[int]) -> list[int]:
        ids = ids[: self.max_seq_len - 1] + [self.tok.eos]
        return ids + [self.tok.pad] * (self.max_seq_len - len(ids))

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.render:
            return {"text_pixels": torch.stack([self.pixels(render_text(t, self.image_size, self.font_size)) for t in texts])}
        return {"input_ids": torch.tensor([self.text_ids(t) for t in texts], dtype=torch.long)}

    def pairs(self, images, texts: list[str]) -> dict[str, torch.Tensor]:
        return {**self.inputs([self.pixels(img) for img in images]), **self.texts(texts)}

    # The streaming pipeline's interface (see processor.Processor.text_row): a record's text is its
    # caption: the caption of a caption record, the first answer of a conversation (LLaVA-Pretrain's
    # "describe the image" → caption layout).

    def text_row(self, turns: list[tuple[str, str]], places):
        if len(places) != 1:  # a pair is one image and its caption
            raise BadSample("too_many_images", f"{len(places)} images for one caption (a contrastive pair has one)")
        caption = turns[0][1]
        if not caption:
            raise BadSample("empty_answer", "empty caption")
        if self.render:
            return caption, False, 1
        ids = self._ids(caption)
        return self._fixed(ids), len(ids) > self.max_seq_len - 1, 1

    def row(self, text, images):
        return self.pixels(next(iter(images))), text

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        items = self.inputs([p for p, _ in rows])
        if self.render:
            return {**items, **self.texts([t for _, t in rows])}
        return {**items, "input_ids": torch.tensor([t for _, t in rows], dtype=torch.long)}


class CaptionerProcessor(ContrastiveProcessor):
    """CoCa's pairs: as a dual encoder's, each caption starting with <bos> (what its captioner
    predicts the first word from, and generates from)."""

    def _ids(self, text: str) -> list[int]:
        return [self.tok.bos, *self.tok.encode(text)]


class SeriesPairProcessor(ContrastiveProcessor):
    """(recording, caption) pairs: a recording opened, checked and batched as the series processor
    does (data/series_processor.py: `series_values` + `series_counts`, any length up to
    series.length: the dual encoder pools each one's own tokens), its caption as for an image."""

    def __init__(self, tokenizer, series: SeriesConfig, text_len: int, one_length: str | None = None):
        """`one_length`: why the model reads recordings of series.length steps only (see SeriesProcessor)."""
        super().__init__(tokenizer, 0, text_len)
        self.series = SeriesProcessor(tokenizer, series, series.num_patches, text_len, one_length)

    def open(self, data, d):
        return self.series.open(data, d)

    def pixels(self, values) -> torch.Tensor:
        return self.series.pixels(values)

    def inputs(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.series.inputs(items)
