"""The processor of a time-series modality: a recording → a checked (C, L) tensor, a conversation →
ids with `<series>` placeholders (one per feature of the series tower) and labels on answers only.

It is the image processor (data/processor.py) with another item: what a row is made of, how rows
are batched and packed, and the checks on the text are the same; the items go under their own batch
key, `series_values` (n, C, L), and fill `<series>` tokens (models/modality.py). A recording must be
a finite array of `series.channels` x `series.length` (either orientation); short gaps of missing
values (NaN, as PAMAP2's files have) up to `series.max_gap` steps are filled by linear interpolation
per channel, anything else is skipped and counted as `series_bad`.
"""

from __future__ import annotations

import numpy as np
import torch

from graft.data.processor import Processor
from graft.data.samples import BadSample
from graft.data.tokenizer import ChatTokenizer
from graft.models.modality import TIME_SERIES
from graft.models.series import SeriesConfig


class SeriesProcessor(Processor):
    def __init__(self, tokenizer: ChatTokenizer, series: SeriesConfig, num_tokens: int, max_seq_len: int):
        super().__init__(tokenizer, 0, num_tokens, max_seq_len, placeholder=tokenizer.placeholder(TIME_SERIES.token))
        self.series = series

    def open(self, data, d) -> tuple[np.ndarray, None]:
        """A recording the source made (an array); files of series are not read yet."""
        if not isinstance(data, np.ndarray):
            raise BadSample("series_bad", f"a {type(data).__name__}, not an array")
        return data, None

    def pixels(self, values: np.ndarray) -> torch.Tensor:
        """(C, L) float32, gaps filled; BadSample where it is not a usable recording."""
        c, n = self.series.channels, self.series.length
        x = np.asarray(values, dtype=np.float32)
        if x.ndim == 2 and x.shape == (n, c) and c != n:
            x = x.T
        if x.shape != (c, n):
            raise BadSample("series_bad", f"shape {tuple(x.shape)}, not ({c}, {n}) (series.channels, series.length)")
        if np.isinf(x).any():
            raise BadSample("series_bad", "infinite values")
        return torch.from_numpy(np.stack([fill_gaps(row, self.series.max_gap) for row in x]))

    def inputs(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        shape = (0, self.series.channels, self.series.length)
        return {TIME_SERIES.inputs: torch.stack(items) if items else torch.zeros(shape)}


def fill_gaps(row: np.ndarray, max_gap: int) -> np.ndarray:
    """One channel with its runs of NaN of at most `max_gap` steps linearly interpolated (the ends
    held at the nearest value); BadSample for a longer run or a channel with nothing else."""
    missing = np.isnan(row)
    if not missing.any():
        return row
    if missing.all():
        raise BadSample("series_bad", "a channel has no values")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], missing.astype(np.int8), [0]])))
    longest = int((edges[1::2] - edges[::2]).max())
    if longest > max_gap:
        raise BadSample("series_bad", f"a gap of {longest} steps > series.max_gap={max_gap}")
    at = np.arange(len(row))
    return np.interp(at, at[~missing], row[~missing]).astype(np.float32)
