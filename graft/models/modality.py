"""Named modality ids: what `modality_ids` (B, T) holds for each token of the LM's sequence.

The decoder's image-specific behaviour (attention, positions, the image tokens' own norms and
FFN, modality-aware MoE routing) asks `== IMAGE`, never a bare number; a new modality whose
tokens enter the sequence is a new id here. A layer's modules of the image tokens' own are named
`<text module>_image` (`image_twins`).
"""

from torch import nn

TEXT = 0
IMAGE = 1


def image_twins(module: nn.Module) -> dict[str, str]:
    """Each parameter of `module`'s image-token modules → the text parameter it starts as. Such a
    module is named `<text module>_image` beside its text twin (the decoder's `lm.modality_norms` /
    `lm.modality_ffn`): a checkpoint saved without them fills them from their twins."""
    names = [name for name, _ in module.named_parameters()]
    have = set(names)
    return {name: name.replace("_image.", ".") for name in names
            if "_image." in name and name.replace("_image.", ".") in have}
