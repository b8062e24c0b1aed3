"""Processor: image → normalised pixels; conversation → token ids with image placeholders and labels.

Chat layout (one image per conversation, in the first user turn):

    <bos> <|user|> <image>×N question <|assistant|> answer <eos> <|user|> question <|assistant|> ...

Labels equal the ids on answer tokens and their <eos> (so the model learns to stop) and are -100
everywhere else: the loss is on answers only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from graft.data.images import open_image, to_rgb
from graft.data.samples import BadSample, encode
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


class Processor:
    def __init__(self, tokenizer: ChatTokenizer, image_size: int, num_image_tokens: int, max_seq_len: int,
                 mean: list[float] | None = None, std: list[float] | None = None):
        self.tok, self.image_size = tokenizer, image_size
        self.num_image_tokens, self.max_seq_len = num_image_tokens, max_seq_len
        # Per-channel normalisation of [0, 1] pixels; None = SigLIP's mean 0.5, std 0.5 ([-1, 1]).
        self.mean, self.std = mean, std

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

    def prompt(self, question: str) -> list[int]:
        """Ids for a single-turn prompt that ends where the answer should begin."""
        t = self.tok
        return [t.bos, t.user] + [t.image] * self.num_image_tokens + t.encode(question) + [t.assistant]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Ids and labels for (question, answer) turns; the image belongs to the first turn.

        Turns that would push the sequence past max_seq_len are dropped whole (never the image).
        """
        t = self.tok
        ids = [t.bos]
        labels = [IGNORE]
        for i, (question, answer) in enumerate(turns):
            image = [t.image] * self.num_image_tokens if i == 0 else []
            prompt = [t.user] + image + t.encode(question) + [t.assistant]
            reply = t.encode(answer) + [t.eos]
            if i > 0 and len(ids) + len(prompt) + len(reply) > self.max_seq_len:
                break
            ids += prompt + reply
            labels += [IGNORE] * len(prompt) + reply
        return ids, labels

    # The streaming pipeline's view of a processor (data/streaming.py): one record's text, then its
    # row, then a batch of rows. A dual encoder's processor (data/contrastive.py) answers the same.

    def text_row(self, turns: list[tuple[str, str]]):
        """(ids, labels) of the conversation, and whether turns were cut to fit; BadSample if unusable."""
        ids, labels, truncated = encode(self, turns)
        return (ids, labels), truncated

    def row(self, text, image: Image.Image):
        ids, labels = text
        return ids, labels, self.pixels(image)

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return collate(rows, self.tok.pad)


def collate(items: list[tuple[list[int], list[int], torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (causal attention never looks right, so no mask is needed)."""
    width = max(len(ids) for ids, _, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (ids, lab, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.stack([p for _, _, p in items])}
