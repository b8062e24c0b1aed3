"""The processor of a time-series modality: a recording → a checked (C, L) tensor, a conversation →
ids with `<series>` placeholders (one per feature of the series tower) and labels on answers only.

It is the image processor (data/processor.py) with another item: what a row is made of, how rows
are batched and packed, and the checks on the text are the same; the items go under their own batch
key, `series_values` (n, C, L), and fill `<series>` tokens (models/modality.py). A recording is a
finite array of `series.channels` channels (either orientation) and up to `series.length` steps;
short gaps of missing values (NaN, as PAMAP2's files have) up to `series.max_gap` steps are filled by
linear interpolation per channel, anything else is skipped and counted as `series_bad`.

Recordings of different lengths: a recording of ℓ steps (series.patch <= ℓ <= series.length) has
the tokens of its own patches (`SeriesConfig.tokens`), the steps after its last patch dropped; its
run of placeholders is cut to that count (`fit`), a batch pads the shorter ones at the end and
carries each one's count as `series_counts` (n,). This needs a connector that maps each patch on
its own (linear, mlp); with another, every recording must have series.length steps.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from graft.data.processor import Processor
from graft.data.samples import BadSample
from graft.data.tokenizer import ChatTokenizer
from graft.models.modality import TIME_SERIES
from graft.models.series import SeriesConfig


class SeriesProcessor(Processor):
    def __init__(self, tokenizer: ChatTokenizer, series: SeriesConfig, num_tokens: int, max_seq_len: int,
                 one_length: str | None = None):
        """`one_length`: why the model reads recordings of series.length steps only (its connector
        merges tokens), or None: any length up to it."""
        super().__init__(tokenizer, 0, num_tokens, max_seq_len, placeholder=tokenizer.placeholder(TIME_SERIES.token))
        self.series, self.one_length = series, one_length

    def open(self, data, d) -> tuple[np.ndarray, None]:
        """A recording the source made (an array), or the bytes of a `.npy` member (a shard's)."""
        if isinstance(data, bytes):
            return npy_array(data), None
        if not isinstance(data, np.ndarray):
            raise BadSample("series_bad", f"a {type(data).__name__}, not an array")
        return data, None

    def pixels(self, values: np.ndarray) -> torch.Tensor:
        """(C, ℓ) float32, gaps filled, cut to the steps its patches read; BadSample where it is not
        a usable recording."""
        s = self.series
        x = np.asarray(values, dtype=np.float32)
        if x.ndim == 2 and x.shape[0] != s.channels and x.shape[1] == s.channels:
            x = x.T
        if x.ndim != 2 or x.shape[0] != s.channels:
            raise BadSample("series_bad", f"shape {tuple(x.shape)}, not ({s.channels}, steps) (series.channels)")
        steps = x.shape[1]
        if steps > s.length or steps < s.patch:
            raise BadSample("series_bad", f"{steps} steps, not between series.patch={s.patch} and series.length={s.length}")
        if steps != s.length and self.one_length:
            raise BadSample("series_bad", f"{steps} steps, not series.length={s.length} ({self.one_length})")
        x = x[:, :s.steps(s.tokens(steps))]
        if np.isinf(x).any():
            raise BadSample("series_bad", "infinite values")
        return torch.from_numpy(np.stack([fill_gaps(row, s.max_gap) for row in x]))

    def fit(self, ids: list[int], labels: list[int] | None, items: list[torch.Tensor]):
        """Item k's run of N placeholders (the k-th N of them) cut to its own token count."""
        counts = [self.series.tokens(x.shape[1]) for x in items]
        n = self.num_image_tokens
        if self.one_length or all(c == n for c in counts):
            return ids, labels
        keep, seen = [], 0
        for t in ids:
            if t == self.placeholder:
                keep.append(seen % n < counts[seen // n])
                seen += 1
            else:
                keep.append(True)
        return [t for t, k in zip(ids, keep) if k], None if labels is None else [t for t, k in zip(labels, keep) if k]

    def inputs(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`series_values` (n, C, longest) with the shorter recordings zero-padded at the end, and
        `series_counts` (n,): each one's tokens (none where every recording has series.length steps)."""
        steps = max((x.shape[1] for x in items), default=self.series.length)
        values = torch.zeros(len(items), self.series.channels, steps)
        for i, x in enumerate(items):
            values[i, :, : x.shape[1]] = x
        if self.one_length:
            return {TIME_SERIES.inputs: values}
        counts = torch.tensor([self.series.tokens(x.shape[1]) for x in items], dtype=torch.long)
        return {TIME_SERIES.inputs: values, TIME_SERIES.counts: counts}


def npy_array(data: bytes) -> np.ndarray:
    """The array of a `.npy` file's bytes, never unpickled: its header must declare numbers whose
    size is the data's (so a lying header allocates nothing), else BadSample."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read(f)
    except (ValueError, KeyError, EOFError) as e:
        raise BadSample("series_bad", f"not a .npy array of format 1.0 or 2.0 ({str(e)[:60]})") from None
    if dtype.kind not in "fiu":
        raise BadSample("series_bad", f"a .npy array of {dtype}, not numbers")
    if math.prod(shape) * dtype.itemsize != len(data) - f.tell():
        raise BadSample("series_bad", f"a .npy header of {shape} {dtype} for {len(data) - f.tell()} bytes of data")
    f.seek(0)
    return np.load(f, allow_pickle=False)


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
