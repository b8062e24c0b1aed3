"""One record of user data → one training example, or the reason it cannot be one.

Every data source (webdataset shards, LLaVA JSON, a Hugging Face dataset) turns a record into an
`Example` (a key, its images' bytes or paths, (question, answer) turns, and where each image goes);
`encode` then runs it through the real processor and checks what would silently break training:

- every image's placeholder run must match the image features (per image: the error names the
  image and both counts; the skip log adds the record's key);
- at least one answer token must survive truncation to `lm.max_seq_len`, else the loss is empty.

Conversations (LLaVA layout: `[{"from": "human"|"gpt", "value": ...}]`, or the chat layout
`[{"role": "user"|"assistant", "content": ...}]`) become (user, assistant) turns; the loss is on
assistant turns only (see processor.py). The `<image>` markers of the user messages say where the
images go, in order, and are removed from the text:
- a user message with one marker gets its image at its start (LLaVA's preprocessing moves a lone
  `<image>` there too, so one-image data keeps the layout it always had);
- a message with several markers gets each image where its marker was ("Image 1: <image> ...");
- with no marker at all, every image goes at the start of the first user message.
Markers and images must be as many (else `placeholder_mismatch`, naming both counts). Anywhere else
(a caption, an answer) `<image>`, like every other control-token string, is plain text: special
tokens come only from the template code (processor.py, hf_tokenizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, groupby
from pathlib import Path

from graft.losses import IGNORE

IMAGE_MARKER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")
Place = tuple[int, int]  # where an image goes: (turn, character offset in that turn's question)
ONE_IMAGE: list[Place] = [(0, 0)]  # the default layout: one image at the start of the first question


class BadSample(Exception):
    """A record that cannot be trained on; `reason` is one of skips.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    key: str
    images: list[bytes | Path]  # in the order of their placeholder runs
    turns: list[tuple[str, str]]
    places: list[Place]  # one per image, in order
    cells: list | None = None  # per image, its cells' classes (the built-in world's `data.cell_targets`)


def check_image_count(n: int, max_images: int) -> None:
    """A record's number of images against `data.max_images` (checked before any image is read)."""
    if n > max_images:
        raise BadSample("too_many_images", f"{n} images > data.max_images={max_images}")


def make_example(key: str, images: list, text: tuple[list[tuple[str, str]], list[Place]]) -> Example:
    """An Example from a source's images and (turns, marker places): images go at their markers, or
    all at the start of the first question when the text has no marker."""
    turns, markers = text
    if markers and len(markers) != len(images):
        raise BadSample("placeholder_mismatch", f"{len(markers)} {IMAGE_MARKER} markers for {len(images)} images")
    return Example(key, list(images), turns, markers or [(0, 0)] * len(images))


def _question(text: str) -> tuple[str, list[int]]:
    """A user message without its markers, and the character offset of each marker in it."""
    parts = text.split(IMAGE_MARKER)
    if len(parts) <= 2:  # no marker, or one: the image (if any) goes at the start
        return "".join(parts).strip(), [0] * (len(parts) - 1)
    joined = "".join(parts)
    lead = len(joined) - len(joined.lstrip())
    question = joined.strip()
    ends = list(accumulate(len(p) for p in parts[:-1]))  # linear: a text may hold many markers
    return question, [min(max(e - lead, 0), len(question)) for e in ends]


def conversation_turns(messages) -> tuple[list[tuple[str, str]], list[Place]]:
    """(user, assistant) pairs from a LLaVA or chat-style message list (system messages are
    dropped), and the place of every `<image>` marker of the user messages, in order."""
    if not isinstance(messages, list):
        raise BadSample("bad_conversation", f"expected a list of messages, got {type(messages).__name__}")
    turns, question, places = [], None, []
    for m in messages:
        if not isinstance(m, dict):
            raise BadSample("bad_conversation", "a message is not an object")
        role, text = m.get("from", m.get("role")), m.get("value", m.get("content"))
        if role == "system":
            continue
        if not isinstance(text, str):
            raise BadSample("bad_conversation", f"message text is {type(text).__name__}, not a string")
        if role in USER_ROLES and question is None:
            question, offsets = _question(text)
            places += [(len(turns), at) for at in offsets]
        elif role in ASSISTANT_ROLES and question is not None:
            turns.append((question, text.strip()))
            question = None
        else:
            raise BadSample("bad_conversation", f"unexpected {role!r} message after {len(turns)} turns")
    if not turns:
        raise BadSample("text_missing", "no user/assistant turn")
    return turns, places


def text_turns(value, caption_prompt: str) -> tuple[list[tuple[str, str]], list[Place]]:
    """Turns (and marker places) from a text field: a caption string, a message list, or an object
    with either. A caption has no markers: `<image>` in it is plain text."""
    if isinstance(value, dict):
        if "conversations" in value:
            return conversation_turns(value["conversations"])
        value = value.get("caption", value.get("text"))
    if isinstance(value, list):
        return conversation_turns(value)
    if not isinstance(value, str):
        raise BadSample("text_missing")
    return [(caption_prompt, value.strip())], []


def image_runs(ids: list[int], image_id: int, n: int) -> list[int]:
    """Placeholders per image, in order: each run of image ids is read as whole images of `n`
    placeholders, then one image holding the remainder (adjacent images make one run)."""
    runs, length = [], 0
    for i in [*ids, None]:
        if i == image_id:
            length += 1
        elif length:
            runs += [n] * (length // n) + ([length % n] if length % n else [])
            length = 0
    return runs


def check_placeholders(ids: list[int], image_id: int, n: int, images: int, row: int = 0) -> None:
    """Every image has its run of `n` placeholders, and there are as many runs as `images`. `row` > 0:
    an image is instead n/row runs of `row` placeholders, each row ended by a newline (Fuyu)."""
    if row:
        rows = [len(list(run)) for is_image, run in groupby(ids, lambda i: i == image_id) if is_image]
        wrong = next((k for k, found in enumerate(rows) if found != row), None)
        if wrong is not None:
            raise BadSample("placeholder_mismatch", f"image row {wrong}: {rows[wrong]} placeholders found, {row} "
                            "expected (a row of image patches)")
        if len(rows) != images * (n // row):
            raise BadSample("placeholder_mismatch", f"{len(rows)} rows of {row} placeholders for {images} images "
                            f"of {n // row} rows")
        return
    runs = image_runs(ids, image_id, n)
    for k, found in enumerate(runs):
        if found != n:
            raise BadSample("placeholder_mismatch", f"image {k}: {found} placeholders found, {n} expected "
                            f"(its image features)")
    if len(runs) != images:  # a safety net: text never encodes to the image token
        raise BadSample("placeholder_mismatch", f"{len(runs)} placeholder runs of {n} for {images} images")


def encode(proc, turns: list[tuple[str, str]], places: list[Place] | None = None) -> tuple[list[int], list[int], bool]:
    """ids, labels (answer tokens only) and whether anything was cut to fit `proc.max_seq_len`.
    `places`: where the images go (default: one image at the start of the first question); the
    images of turns dropped to fit go with them (`proc.text_row` counts those kept)."""
    if any(not answer for _, answer in turns):
        raise BadSample("empty_answer")
    places = ONE_IMAGE if places is None else places
    ids, labels, kept = proc.encode_conversation(turns, places)
    truncated = len(ids) > proc.max_seq_len or kept < len(turns)
    ids, labels = ids[: proc.max_seq_len], labels[: proc.max_seq_len]
    images = sum(1 for turn, _ in places if turn < kept)
    if all(label == IGNORE for label in labels):
        what = f" (with {images} images of {proc.num_image_tokens} placeholders)" if images > 1 else ""
        raise BadSample("answer_truncated", f"prompt{what} is longer than lm.max_seq_len={proc.max_seq_len}")
    if places and not images:  # the image turns were dropped: what is left would train text only
        raise BadSample("answer_truncated", f"no turn with an image fits in lm.max_seq_len={proc.max_seq_len}")
    check_placeholders(ids, proc.placeholder, proc.num_image_tokens, images, proc.image_row)
    return ids, labels, truncated
