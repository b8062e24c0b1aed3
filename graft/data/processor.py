"""Processor: image → normalised pixels; conversation → token ids with image placeholders and labels.

Chat layout (by default one image, at the start of the first user turn):

    <bos> <|user|> <image>×N question <|assistant|> answer <eos> <|user|> question <|assistant|> ...

With several images each gets its own run of N placeholders where the data put it (`places`:
(turn, character offset in the question), see samples.py), e.g. `<|user|> <image>×N \n <image>×N
which is bigger? <|assistant|>` or `<|user|> first: <image>×N second: <image>×N <|assistant|>`;
two images with no text between them are kept apart by a newline, so every run is one image.

Labels equal the ids on answer tokens and their <eos> (so the model learns to stop) and are -100
everywhere else: the loss is on answers only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from graft.data.cells import cell_targets
from graft.data.images import open_image, open_within, to_rgb
from graft.data.samples import ONE_IMAGE, BadSample, Place, encode
from graft.data.tokenizer import ChatTokenizer
from graft.errors import UserError
from graft.losses import IGNORE

MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images before decoding them (decompression bombs)


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open any PNG/JPEG/... a user points at, as RGB; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file not found: {path}")
    try:
        return open_image(path, max_pixels)[0]
    except BadSample as e:
        raise UserError(f"{path} is not a usable image ({e})") from None


# earlier turns of a prompt and where their images go (Processor.prompt)
Context = tuple[list[tuple[str, str]], list[Place]]


class Processor:
    reads_captions = False  # its rows are conversations (a dual encoder's processor reads (image, caption) pairs)

    def __init__(self, tokenizer: ChatTokenizer, image_size: int, num_image_tokens: int, max_seq_len: int,
                 mean: list[float] | None = None, std: list[float] | None = None, image_row: int = 0,
                 placeholder: int | None = None):
        self.tok, self.image_size = tokenizer, image_size
        # the token each feature of an item fills: <image>, or another modality's (SeriesProcessor)
        self.placeholder = tokenizer.image if placeholder is None else placeholder
        self.num_image_tokens, self.max_seq_len = num_image_tokens, max_seq_len
        # Fuyu: a newline token after every `image_row` placeholders (each row of patches); 0 = none
        self.image_row = image_row
        # Per-channel normalisation of [0, 1] pixels; None = SigLIP's mean 0.5, std 0.5 ([-1, 1]).
        self.mean, self.std = mean, std

    def open(self, data, d) -> tuple[Image.Image, str | None]:
        """One of a record's items, decoded within the data config's limits (`images.open_within`),
        and how it was converted (or None); BadSample if unusable."""
        return open_within(data, d)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """(3, S, S) float: (x/255 - mean) / std, by default in [-1, 1] (SigLIP: mean 0.5, std 0.5)."""
        img = to_rgb(img)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
        if self.mean is None or (list(self.mean) == [0.5] * 3 and list(self.std) == [0.5] * 3):
            return x / 127.5 - 1.0
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (x / 255.0 - mean) / std

    def prompt(self, question: str, images: int = 1, context: Context = ((), ()),
               at: list[int] | None = None) -> list[int]:
        """Ids for a prompt with `images` images in its question — at the character offsets `at`,
        by default all at the start — ending where the answer should begin; `context`: earlier
        (turns, places) before it (few-shot examples, a document), never cut to max_seq_len."""
        t, (turns, places) = self.tok, context
        ids = [t.bos]
        for i, (q, answer) in enumerate(turns):
            ids += [t.user] + self._question(q, [o for turn, o in places if turn == i]) + [t.assistant]
            ids += t.encode(answer) + [t.eos]
        return ids + [t.user] + self._question(question, [0] * images if at is None else at) + [t.assistant]

    def _question(self, question: str, offsets: list[int]) -> list[int]:
        """A question's ids with N placeholders per image, at the images' character offsets. Two
        images with no text between them are kept apart by a newline, so that each image is one run
        of image tokens (what the decoder's image masks and positions see as one image)."""
        t, ids, at = self.tok, [], 0
        for k, offset in enumerate(offsets):
            ids += t.encode(question[at:offset]) if offset > at else t.encode("\n") if k else []
            ids += self._placeholders()
            at = offset
        return ids + t.encode(question[at:])

    def _placeholders(self) -> list[int]:
        """One image's placeholders: N <image> tokens, or rows of them each ended by a newline."""
        if not self.image_row:
            return [self.placeholder] * self.num_image_tokens
        row = [self.placeholder] * self.image_row + self.tok.encode("\n")
        return row * (self.num_image_tokens // self.image_row)

    def conversation(self, turns: list[tuple[str, str]], places: list[Place] | None = None) -> tuple[list[int], list[int]]:
        """Ids and labels for (question, answer) turns; `places` says where the images go (default:
        one image at the start of the first turn). Turns past max_seq_len are dropped whole."""
        ids, labels, _ = self.encode_conversation(turns, places)
        return ids, labels

    def encode_conversation(self, turns: list[tuple[str, str]],
                            places: list[Place] | None = None) -> tuple[list[int], list[int], int]:
        """`conversation`, and how many turns it kept: those that would push the sequence past
        max_seq_len are dropped whole, with their images (never the first turn, nor part of a run)."""
        t, places = self.tok, ONE_IMAGE if places is None else places
        ids = [t.bos]
        labels = [IGNORE]
        for i, (question, answer) in enumerate(turns):
            prompt = [t.user] + self._question(question, [at for turn, at in places if turn == i]) + [t.assistant]
            reply = t.encode(answer) + [t.eos]
            if i > 0 and len(ids) + len(prompt) + len(reply) > self.max_seq_len:
                return ids, labels, i
            ids += prompt + reply
            labels += self._prompt_labels(question, prompt) + reply
        return ids, labels, len(turns)

    def _prompt_labels(self, question: str, prompt: list[int]) -> list[int]:
        """IGNORE over the prompt, but for the tokens of a `Supervised` question's spans (the built-in
        world's grounded questions, data/grounding.py), which are targets. A question read from data
        is a plain string: its prompt is never a target."""
        labels = [IGNORE] * len(prompt)
        spans = getattr(question, "spans", ())
        if not spans:
            return labels
        cuts = [0, *(c for span in spans for c in span), len(question)]
        pieces = [self.tok.encode(question[a:b]) if b > a else [] for a, b in zip(cuts, cuts[1:])]
        text = [t for piece in pieces for t in piece]
        start = len(prompt) - 1 - len(text)  # the question's text ends the prompt, before <|assistant|>
        if prompt[start:-1] != text:
            raise ValueError(f"the spans of {question!r} do not fall on token boundaries")
        targets = [t if k % 2 else IGNORE for k, piece in enumerate(pieces) for t in piece]  # odd pieces: spans
        return labels[:start] + targets + [IGNORE]

    # The streaming pipeline's view of a processor (data/streaming.py): one record's text, then its
    # row, then a batch of rows. A dual encoder's processor (data/contrastive.py) answers the same.

    def text_row(self, turns: list[tuple[str, str]], places: list[Place], cells: list | None = None):
        """(ids, labels) of the conversation, whether turns were cut to fit, and how many of the
        record's images (the first ones) the kept turns hold; BadSample if unusable. The heads'
        targets follow where there are any: the spatial head's, then the cell head's (`cells`:
        the record's images' cell classes, data/cells.py)."""
        ids, labels, truncated = encode(self, turns, places)
        kept = ids.count(self.placeholder) // self.num_image_tokens
        compare = compare_targets(ids, turns, getattr(self.tok, "assistant", None))
        cell = cell_targets(ids, self.placeholder, cells[:kept]) if cells else []
        return (ids, labels, *((compare, cell) if cell else (compare,) if compare else ())), truncated, kept

    def row(self, text, images) -> tuple:
        """`images`: the kept images (PIL), an iterable read one at a time (one decoded image in memory).
        (ids, labels, items), and the heads' targets where the text has them."""
        ids, labels, *targets = text
        items = [self.pixels(image) for image in images]
        return *self.fit(ids, labels, items), items, *targets

    def fit(self, ids: list[int], labels: list[int] | None, items: list[torch.Tensor]):
        """(ids, labels) with each item's run of placeholders cut to the item's own token count
        (a shorter series' fewer patches, SeriesProcessor); every image has them all."""
        return ids, labels

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return collate(rows, self.tok.pad, inputs=self.inputs)

    def inputs(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch's items (every row's, in order) under the modality's batch key."""
        return {"pixel_values": stack_images(items, self.image_size)}


def images_of(pixels) -> list[torch.Tensor]:
    """A row's images: one (3, S, S) tensor (the built-in world) or a list of them, in run order."""
    return [pixels] if isinstance(pixels, torch.Tensor) else list(pixels)


def stack_images(images: list[torch.Tensor], image_size: int | None) -> torch.Tensor:
    """(n, 3, S, S); a batch of text-only rows gives (0, 3, S, S)."""
    if images:
        return torch.stack(images)
    if image_size is None:
        raise ValueError("a batch without images needs the image size for its empty pixel_values")
    return torch.zeros(0, 3, image_size, image_size)


def compare_targets(ids: list[int], turns: list[tuple[str, str]], assistant: int) -> list[tuple[int, int, int]]:
    """(position, column order, row order) at the answer position (the `<|assistant|>` token) of each
    kept turn whose question carries the spatial head's target (data/grounding.py `compared_turns`)."""
    if not any(getattr(q, "compare", None) for q, _ in turns):
        return []
    at = [i for i, t in enumerate(ids) if t == assistant]  # one per kept turn, in order
    return [(i, *q.compare) for i, (q, _) in zip(at, turns) if getattr(q, "compare", None)]


# The heads' targets an item may carry after (ids, labels, pixels): (batch key, classes per position)
HEAD_TARGETS = (("compare_labels", 2), ("cell_labels", 5))


def head_labels(items: list, width: int, rows: list[list[tuple[int, tuple]]] | None = None) -> dict[str, torch.Tensor]:
    """{"compare_labels": (R, width, 2), "cell_labels": (R, width, 5)} from the items' targets
    (their 4th and 5th elements: (position, classes...) lists), each only where an item has any;
    `rows`: each row's (start, item) pairs when packed, else item r is row r."""
    out = {}
    groups = [[(0, item)] for item in items] if rows is None else rows
    for k, (key, n) in enumerate(HEAD_TARGETS, start=3):
        if not any(len(item) > k and item[k] for item in items):
            continue
        where = [(r, start + target[0], target[1:]) for r, group in enumerate(groups) for start, item in group
                 for target in (item[k] if len(item) > k else ())]
        labels = torch.full((len(groups), width, n), IGNORE, dtype=torch.long)
        rows_at, columns_at, classes = zip(*where)
        labels[list(rows_at), list(columns_at)] = torch.tensor(classes)
        out[key] = labels
    return out


def collate(items: list[tuple[list[int], list[int], object]], pad_id: int,
            image_size: int | None = None, inputs=None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (causal attention never looks right, so no mask is needed).
    pixel_values (total images, 3, S, S): every row's images in order, rows top to bottom, which is
    the order of their placeholder runs read row by row (the order `VLM.embed` fills them in);
    `inputs` (the processor's): those items under their modality's key instead."""
    width = max(len(item[0]) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (ids, lab, *_) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
    pixels = [p for item in items for p in images_of(item[2])]
    return {"input_ids": input_ids, "labels": labels, **head_labels(items, width),
            **(inputs(pixels) if inputs else {"pixel_values": stack_images(pixels, image_size)})}
