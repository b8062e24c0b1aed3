"""One record of user data → one training example, or the reason it cannot be one.

Every data source (webdataset shards, LLaVA JSON, a Hugging Face dataset) turns a record into an
`Example` (a key, the image's bytes or path, and (question, answer) turns); `encode` then runs it
through the real processor and checks what would silently break training:

- the text's image placeholders must match the image features (one image, in the first turn);
- at least one answer token must survive truncation to `lm.max_seq_len`, else the loss is empty.

Conversations (LLaVA layout: `[{"from": "human"|"gpt", "value": ...}]`, or the chat layout
`[{"role": "user"|"assistant", "content": ...}]`) become (user, assistant) turns; the loss is on
assistant turns only (see processor.py). The `<image>` marker is removed from the text: the
processor puts the image's tokens at the start of the first user turn wherever the marker was.
Anywhere else (a caption, an answer) `<image>`, like every other control-token string, is plain
text: special tokens come only from the template code (processor.py, hf_tokenizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft.losses import IGNORE

IMAGE_MARKER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")


class BadSample(Exception):
    """A record that cannot be trained on; `reason` is one of skips.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    key: str
    image: bytes | Path | None
    turns: list[tuple[str, str]]


def conversation_turns(messages) -> list[tuple[str, str]]:
    """(user, assistant) pairs from a LLaVA or chat-style message list; system messages are dropped."""
    if not isinstance(messages, list):
        raise BadSample("bad_conversation", f"expected a list of messages, got {type(messages).__name__}")
    turns, question, markers = [], None, 0
    for m in messages:
        if not isinstance(m, dict):
            raise BadSample("bad_conversation", "a message is not an object")
        role, text = m.get("from", m.get("role")), m.get("value", m.get("content"))
        if role == "system":
            continue
        if not isinstance(text, str):
            raise BadSample("bad_conversation", f"message text is {type(text).__name__}, not a string")
        if role in USER_ROLES and question is None:
            markers += text.count(IMAGE_MARKER)
            question = text.replace(IMAGE_MARKER, "").strip()
        elif role in ASSISTANT_ROLES and question is not None:
            turns.append((question, text.strip()))
            question = None
        else:
            raise BadSample("bad_conversation", f"unexpected {role!r} message after {len(turns)} turns")
    if markers > 1:
        raise BadSample("placeholder_mismatch", f"{markers} {IMAGE_MARKER} markers for one image")
    if not turns:
        raise BadSample("text_missing", "no user/assistant turn")
    return turns


def text_turns(value, caption_prompt: str) -> list[tuple[str, str]]:
    """Turns from a text field: a caption string, a message list, or an object with either."""
    if isinstance(value, dict):
        if "conversations" in value:
            return conversation_turns(value["conversations"])
        value = value.get("caption", value.get("text"))
    if isinstance(value, list):
        return conversation_turns(value)
    if not isinstance(value, str):
        raise BadSample("text_missing")
    return [(caption_prompt, value.strip())]


def encode(proc, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], bool]:
    """ids, labels (answer tokens only) and whether anything was cut to fit `proc.max_seq_len`."""
    if any(not answer for _, answer in turns):
        raise BadSample("empty_answer")
    ids, labels = proc.conversation(turns)
    answers = sum(1 for i, label in zip(ids, labels) if label == proc.tok.eos)
    truncated = len(ids) > proc.max_seq_len or answers < len(turns)
    ids, labels = ids[: proc.max_seq_len], labels[: proc.max_seq_len]
    placeholders = ids.count(proc.tok.image)
    if placeholders != proc.num_image_tokens:  # a safety net: text never encodes to the image token
        raise BadSample("placeholder_mismatch", f"{placeholders} image tokens for {proc.num_image_tokens} features")
    if all(label == IGNORE for label in labels):
        raise BadSample("answer_truncated", f"prompt is longer than lm.max_seq_len={proc.max_seq_len}")
    return ids, labels, truncated
