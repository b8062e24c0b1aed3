"""Packing: several conversations share one row, so a batch carries (almost) no padding.

Right-padding a batch to its longest conversation wastes the LM's work on pad tokens (29 % of
the positions of a `shapes_vqa` batch). Packing fills rows of at most `max_len` tokens with whole
conversations, first fit in decreasing length. Every token gets a document id and a position
inside its document; the decoder attends causally *within* a document and restarts RoPE at each
one (`LanguageModel.forward(position_ids=, doc_ids=)`), so each conversation gets exactly the
logits it would get alone, and the loss (the mean over the same supervised tokens) is unchanged.

A conversation may hold several images (or none); images keep the order of their placeholder
runs when the rows are read left to right, top to bottom, which is the order `VLM.embed` scatters
image features in.
"""

from __future__ import annotations

import torch

from graft.data.processor import head_labels, images_of, stack_images
from graft.losses import IGNORE

# (ids, labels, pixels) of one conversation; pixels: one (3, S, S) tensor or a list, in run order;
# a 4th and 5th element, where present: the spatial and cell heads' targets (processor.head_labels)
Item = tuple[list[int], list[int], object]

# Rows are padded to a multiple of this many tokens (never past max_len): a run then meets a few
# batch shapes, not one per longest row, and each new shape costs a FLOP-counting pass
# (trainer/flops.py) and, compiled, a recompile. At most WIDTH_STEP - 1 pad tokens per row.
WIDTH_STEP = 64


def first_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Item indices per row: each item, longest first, goes into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:  # a new row; an item longer than max_len gets a row of its own
            rows.append([])
            room.append(max(max_len, lengths[i]))
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack(items: list[Item], pad_id: int, max_len: int, image_size: int | None = None,
         inputs=None) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids, doc_ids (R, W) and pixel_values (images, 3, S, S), or with
    `inputs` (the processor's) the items under their modality's key.

    Padding at the end of a row is a document of its own (id = number of documents in the row),
    so no token's attention row is empty.
    """
    rows = first_fit([len(item[0]) for item in items], max_len)
    width = max(sum(len(items[i][0]) for i in row) for row in rows)
    width = max(width, min(max_len, -(-width // WIDTH_STEP) * WIDTH_STEP))
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.zeros(shape, dtype=torch.long)
    pixels, starts = [], []
    for r, row in enumerate(rows):
        at = 0
        starts.append([])
        for doc, i in enumerate(row):
            ids, lab, pix = items[i][:3]
            n = len(ids)
            starts[r].append((at, items[i]))
            input_ids[r, at:at + n] = torch.tensor(ids)
            labels[r, at:at + n] = torch.tensor(lab)
            position_ids[r, at:at + n] = torch.arange(n)
            doc_ids[r, at:at + n] = doc
            pixels += images_of(pix)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
        doc_ids[r, at:] = len(row)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids,
            **head_labels(items, width, starts),
            **(inputs(pixels) if inputs else {"pixel_values": stack_images(pixels, image_size)})}
