"""What `graft serve` accepts (graft/serve.py): a request body's fields checked one by one, each
refusal a `BadRequest` naming the field and why (the server answers it as a 4xx JSON error and goes
on); images only from `data:` URLs, decoded through graft's guards for untrusted bytes."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import torch

from graft.data.images import open_within
from graft.data.samples import BadSample

MAX_INPUTS = 64  # texts or images of one embeddings request; labels of one zero-shot request
MAX_TEXT = 2000  # characters of one text, label or template (the text tower reads text.max_len tokens)
MAX_TEMPLATES = 8

class BadRequest(Exception):
    """A request refused with `status` and a message naming the problem (OpenAI's error shape)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Completion:
    """A checked request: prompt ids, pixels (n_images, 3, S, S) and how to decode."""

    ids: list[int]
    pixels: torch.Tensor
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stream: bool


def check_number(body: dict, name: str, kind: type, lo: float, hi: float, default):
    """body[name] (or `default` when absent/null), an int or number within [lo, hi]."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not lo <= value <= hi:
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer'} in [{lo}, {hi}], got {value!r}")
    return kind(value)


def _content(content, where: str) -> tuple[str, list[tuple[str, int]]]:
    """A message's text (its text parts joined by newlines) and its image URLs, each with the
    character offset in that text where it stands: `content` is a string or a list of text /
    image_url parts, in order."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts")
    texts, urls = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
            urls.append((part["image_url"]["url"], len("\n".join(texts))))
        else:
            raise BadRequest(f"{where}.content[{i}] must be {{'type': 'text', 'text': ...}} or "
                             "{'type': 'image_url', 'image_url': {'url': 'data:...'}}")
    return "\n".join(texts), urls


def conversation(messages) -> tuple[list[tuple[str, str]], str, list[tuple[str, int]]]:
    """(earlier (user, assistant) turns, the last user message's text, its image URLs with their
    offsets in that text) of OpenAI `messages`: user and assistant alternating, ending with the
    user; only the last holds images."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    roles = [m.get("role") for m in messages]
    if len(messages) % 2 == 0 or roles != [("user", "assistant")[i % 2] for i in range(len(messages))]:
        raise BadRequest(f"messages must alternate user and assistant and end with user (system messages are "
                         f"not supported); got roles {roles}")
    for i, m in enumerate(messages):
        if set(m) - {"role", "content"}:
            raise BadRequest(f"messages[{i}]: unknown field {min(set(m) - {'role', 'content'})!r} "
                             "(supported: role, content)")
    parts = [_content(m.get("content"), f"messages[{i}]") for i, m in enumerate(messages)]
    if any(urls for _, urls in parts[:-1]):
        raise BadRequest("only the last user message may hold an image")
    turns = [(parts[i][0], parts[i + 1][0]) for i in range(0, len(parts) - 1, 2)]
    return turns, parts[-1][0], parts[-1][1]


def decode_image(url: str, d):
    """The RGB image of a `data:image/...;base64,...` URL, through graft's guards for untrusted bytes."""
    if not url.startswith("data:"):
        raise BadRequest(f"image_url must be a data: URL (base64); nothing is fetched, got {url[:40]!r}")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise BadRequest("image_url must be data:<type>;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image_url: the data is not valid base64") from None
    try:
        return open_within(data, d)[0]
    except BadSample as e:
        raise BadRequest(f"image_url is not a usable image ({e})") from None


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise BadRequest(f"{where} must be a non-empty string of at most {MAX_TEXT} characters")
    return value


def check_texts(value, where: str, most: int) -> list[str]:
    """`value`: a list of 1 to `most` non-empty strings."""
    if not isinstance(value, list) or not 0 < len(value) <= most:
        raise BadRequest(f"{where} must be a list of 1 to {most} strings")
    return [_text(v, f"{where}[{i}]") for i, v in enumerate(value)]


def check_url(value, where: str) -> str:
    if not isinstance(value, dict) or set(value) != {"url"} or not isinstance(value["url"], str):
        raise BadRequest(f"{where} must be {{'url': 'data:image/...;base64,...'}}")
    return value["url"]


def check_inputs(value) -> list[tuple[str, str]]:
    """("text", text) and ("image", url) of the `input` of /v1/embeddings: a string, or a list of
    strings and {'image_url': {'url': ...}} objects (graft's extension)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 0 < len(items) <= MAX_INPUTS:
        raise BadRequest(f"input must be a string or a list of 1 to {MAX_INPUTS} strings and "
                         "{'image_url': {'url': 'data:...'}} objects (token arrays are not accepted)")
    if any(isinstance(x, dict) and set(x) != {"image_url"} for x in items):
        raise BadRequest("an object in input must be {'image_url': {'url': 'data:...'}} and nothing else")
    return [("image", check_url(x["image_url"], f"input[{i}].image_url")) if isinstance(x, dict)
            else ("text", _text(x, f"input[{i}]")) for i, x in enumerate(items)]


def check_stream(value) -> bool:
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"stream must be true or false, got {value!r}")
    return bool(value)
