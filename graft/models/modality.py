"""Named modality ids: what `modality_ids` (B, T) holds for each token of the LM's sequence.

The decoder's image-specific behaviour (attention, positions, the image tokens' own norms and
FFN, modality-aware MoE routing) asks `== IMAGE`, never a bare number; a new modality whose
tokens enter the sequence is a new id here.
"""

TEXT = 0
IMAGE = 1
