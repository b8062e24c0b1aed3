"""The modalities a batch carries: named ids of the LM's sequence, and each modality's batch keys.

`modality_ids` (B, T) holds TEXT, IMAGE or SERIES for each token of the LM's sequence. The decoder's
image-specific behaviour (attention, positions, the image tokens' own norms and FFN,
modality-aware MoE routing) asks `== IMAGE`, never a bare number. A layer's modules of the image
tokens' own are named `<text module>_image` (`image_twins`).

A batch carries each modality's items under the modality's own key, item first (`inputs`: the
images' `pixel_values` (n, 3, S, S), a series' `series_values` (n, C, L)), and, where its items'
token counts differ, each item's count (n,) under `counts` (`series_counts`: a shorter recording
has fewer patches; its values are padded at the end). Without counts every item has the model's
`num_image_tokens`. The trainer counts items through `MODALITIES` (`items`), never by an image key.
A modality whose items enter the sequence is a `Modality` here, with its source (data/sources.py),
tower and processor; each of its features fills one of its placeholder tokens.
"""

from dataclasses import dataclass

from torch import nn

TEXT = 0
IMAGE = 1
SERIES = 2


@dataclass(frozen=True)
class Modality:
    name: str
    id: int  # in `modality_ids`
    inputs: str  # the batch key of its items' inputs, item first
    token: str  # the special token each of an item's features fills (its placeholder)
    counts: str  # the batch key of its items' token counts, where they differ


IMAGES = Modality("image", IMAGE, "pixel_values", "<image>", "image_counts")
# multichannel time series (models/series.py), of any length up to series.length
TIME_SERIES = Modality("series", SERIES, "series_values", "<series>", "series_counts")
MODALITIES = (IMAGES, TIME_SERIES)


def items(batch: dict) -> int:
    """The items of every modality a batch holds (images, series; a dual encoder's image–text pairs)."""
    return sum(batch[m.inputs].shape[0] for m in MODALITIES if m.inputs in batch)


def image_twins(module: nn.Module) -> dict[str, str]:
    """Each parameter of `module`'s image-token modules → the text parameter it starts as. Such a
    module is named `<text module>_image` beside its text twin (the decoder's `lm.modality_norms` /
    `lm.modality_ffn`): a checkpoint saved without them fills them from their twins."""
    names = [name for name, _ in module.named_parameters()]
    have = set(names)
    return {name: name.replace("_image.", ".") for name in names
            if "_image." in name and name.replace("_image.", ".") in have}
