"""Hugging Face tokenizers and chat templates: for `lm.hf_path` runs, and for exporting graft's own.

`HFChatTokenizer` gives an `AutoTokenizer` loaded from a folder the interface of `ChatTokenizer`
(`.pad`, `.eos`, `.image`, `encode`, `decode`, `len`, `save`), adding an `<image>` special token
if the tokenizer lacks one (the LM's embeddings are resized to match).

`TemplateProcessor` renders conversations with the tokenizer's own chat template (or
`FALLBACK_TEMPLATE` when it has none). An image at the start of a user message is one `<image>`
followed by a newline (LLaVA's layout; by default one image, in the first message), an image
inside the text one `<image>` where the data put it; after tokenisation each such id becomes N
placeholders, exactly what `transformers.LlavaProcessor` does to the text. The whole
conversation is tokenised as one string, and labels are set on the tokens that overlap the
characters of an assistant reply (found by rendering the conversation turn by turn), so training
sees the same tokens inference does.

Text from data never becomes a control token. Tokenising the rendered string as one would turn a
"<|im_end|>", "</s>" or "<image>" typed in a question or answer into the token itself (ending a
turn early, or adding image placeholders with no image). So each question and answer is first
searched for the tokenizer's control strings (`HFChatTokenizer.controls`: its special tokens,
<image>, bos/eos/pad). Nearly always there are none, and the string is tokenised in one piece as
above (bit for bit what it always was). When there are some, the conversation is rendered once
more with each question and answer between two private-use marker characters, which show where
the template put them; the text is then tokenised piece by piece: the template's text with its
control tokens, the data strings as plain text. The cost: a piece is tokenised on its own, so the
tokens at its edges can differ from a joint encoding (as if a space separated the piece from its
neighbours; for SentencePiece tokenizers each piece is encoded after a newline that is then dropped,
as `transformers`' `encode_marked_chat` does, so no word-start mark is added). A template that
rewrites message text (so the markers no longer bracket it exactly) makes such a record a
`BadSample("text_control_token")` rather than a guess; markers, not a search for the string, are
used because a template's own text can contain the same control token just before the data.

`GRAFT_TEMPLATE` reproduces `Processor`'s built-in layout exactly; export attaches it to graft's
own tokenizer so that `AutoProcessor` builds the same input ids as graft.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tokenizers import AddedToken

from graft.data.processor import Context, Processor
from graft.data.samples import ONE_IMAGE, BadSample, Place
from graft.errors import UserError
from graft.losses import IGNORE

IMAGE_TOKEN = "<image>"
# Private-use characters around each question and answer while rendering, to find them in the output.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKED = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.DOTALL)

# Content may be a string or HF's list form [{"type": "image"}, {"type": "text", "text": ...}].
_CONTENT = (
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
)
# graft's built-in layout: <bos><|user|><image>×N question<|assistant|>answer<eos><|user|>...
GRAFT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>" + _CONTENT
    + "<|assistant|>{% elif m['role'] == 'assistant' %}" + _CONTENT + "{{ eos_token }}{% endif %}{% endfor %}"
)
# For a tokenizer without a chat template (LLaVA-1.5's plain "USER: ... ASSISTANT:" layout). HF renders
# templates with trim_blocks, which eats a newline right after a block tag: hence {{ '\n' }}.
FALLBACK_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    + _CONTENT + "{{ '\\n' }}{% elif m['role'] == 'assistant' %}ASSISTANT:\n" + _CONTENT
    + "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


class HFChatTokenizer:
    """An HF tokenizer with ChatTokenizer's attributes; `.tok` is the transformers tokenizer."""

    def __init__(self, tok):
        if not getattr(tok, "is_fast", False):
            raise UserError(f"{tok.name_or_path}: graft needs a fast tokenizer (tokenizer.json)")
        if tok.eos_token_id is None:
            raise UserError(f"{tok.name_or_path}: the tokenizer has no eos_token (needed to end answers)")
        if IMAGE_TOKEN not in tok.get_vocab():
            raise UserError(f"{tok.name_or_path}: the tokenizer has no {IMAGE_TOKEN} token (use HFChatTokenizer.load)")
        self.tok = tok
        self.image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos, self.bos = tok.eos_token_id, tok.bos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Strings data text must not turn into ids: special added tokens (chat markers, <image>) and
        # bos/eos/pad/unk, which may be ordinary vocabulary entries. Longest first, so a match is whole.
        controls = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        controls |= {t for t in tok.all_special_tokens if t} | {IMAGE_TOKEN}
        self.controls = re.compile("|".join(map(re.escape, sorted(controls, key=len, reverse=True))))
        # unk is left out: plain text may legitimately need it.
        self.control_ids = {tok.convert_tokens_to_ids(t) for t in controls if t != tok.unk_token}
        self.newline = tok.encode("\n", add_special_tokens=False)

    @classmethod
    def load(cls, path: str | Path, key: str = "tokenizer") -> HFChatTokenizer:
        """AutoTokenizer from a local folder, plus <image> and a chat template if missing;
        errors name `key` (the config key that gave the folder)."""
        # lazy: transformers takes ~0.5 s to import
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{key}={path}: cannot load a tokenizer ({str(e).splitlines()[0][:100]})") from None
        if IMAGE_TOKEN not in tok.get_vocab():
            tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        if not tok.chat_template:
            tok.chat_template = FALLBACK_TEMPLATE
        return cls(tok)

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: a special token written in it is spelled out, never its id."""
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def render(self, messages: list[dict], generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def save(self, folder: Path) -> None:
        self.tok.save_pretrained(str(folder))

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of the concatenated (text, is_data) pieces of a rendered chat:
        data as plain text, the template's text with its control tokens."""
        ids, offsets, at = [], [], 0
        for text, data in pieces:
            piece_ids, piece_offsets = self._encode_piece(text, data, at == 0)
            if data and not self.control_ids.isdisjoint(piece_ids):  # e.g. eos as an ordinary BPE word
                raise BadSample("text_control_token", f"plain text encodes to a control token: {text[:60]!r}")
            ids += piece_ids
            offsets += [(start + at, end + at) for start, end in piece_offsets]
            at += len(text)
        return ids, offsets

    def _encode_piece(self, text: str, plain: bool, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
        def encode(s):
            enc = self.tok(s, add_special_tokens=False, split_special_tokens=plain, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]

        if not first:  # after a newline, which is then dropped: see the module docstring
            ids, offsets = encode("\n" + text)
            n = len(self.newline)
            if ids[:n] == self.newline:
                return ids[n:], [(start - 1, end - 1) for start, end in offsets[n:]]
        return encode(text)


class TemplateProcessor(Processor):
    """Processor whose text side is the tokenizer's chat template (pixels as in `Processor`)."""

    tok: HFChatTokenizer

    def _messages(self, turns: list[tuple[str, str | None]], wrap: Callable[[str], str] = str,
                  places: list[Place] = ONE_IMAGE) -> list[dict]:
        """Chat messages for (question, answer) turns with <image> at `places`; `wrap` is applied to
        each piece of data text (`_pieces`); an answer None ends the messages on a question."""
        messages = []
        for i, (question, answer) in enumerate(turns):
            pieces = _pieces(question, [at for turn, at in places if turn == i])
            # an image at the start is followed by a newline (LLaVA), as is one right before another
            content = "".join(wrap(piece) if piece is not None else IMAGE_TOKEN + (
                "\n" if at == 0 or pieces[k + 1][0] is None else "") for k, (piece, at) in enumerate(pieces))
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": wrap(answer)})
        return messages

    @staticmethod
    def _data(turns: list[tuple[str, str | None]], places: list[Place]) -> list[str]:
        """The data strings `_messages` wraps, in order."""
        out = []
        for i, (question, answer) in enumerate(turns):
            out += [p for p, _ in _pieces(question, [at for turn, at in places if turn == i]) if p is not None]
            out += [answer] if answer is not None else []
        return out

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Each <image> id becomes num_image_tokens placeholders (unsupervised)."""
        out_ids, out_labels = [], []
        for i, lab in zip(ids, labels):
            n = self.num_image_tokens if i == self.tok.image else 1
            out_ids += [i] * n
            out_labels += [lab if n == 1 else IGNORE] * n
        return out_ids, out_labels

    def _encode(self, turns: list[tuple[str, str | None]], generation: bool, text: str,
                places: list[Place] = ONE_IMAGE) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text`, the rendering of `turns`, with no control token from data."""
        data = self._data(turns, places)
        if not any(self.tok.controls.search(s) for s in data):  # nearly always: one string, as inference sees it
            enc = self.tok.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]
        marked = self.tok.render(self._messages(turns, lambda s: _OPEN + s + _CLOSE, places), generation)
        parts = _MARKED.split(marked)  # [template, data, template, ..., data, template]
        if parts[1::2] != data or "".join(parts) != text:
            raise BadSample("text_control_token", "the chat template rewrites message text, so control tokens "
                            "in it cannot be told from the template's own")
        return self.tok.encode_pieces([(part, i % 2 == 1) for i, part in enumerate(parts) if part])

    def prompt_text(self, question: str, images: int = 1, context: Context = ((), ()),
                    at: list[int] | None = None) -> str:
        turns, places = self._prompt_turns(question, images, context, at)
        return self.tok.render(self._messages(turns, places=places), generation=True)

    def prompt(self, question: str, images: int = 1, context: Context = ((), ()),
               at: list[int] | None = None) -> list[int]:
        """Processor.prompt's ids through the chat template (`at`: the images' offsets in the question)."""
        turns, places = self._prompt_turns(question, images, context, at)
        ids, _ = self._encode(turns, True, self.prompt_text(question, images, context, at), places)
        return self._expand(ids, ids)[0]

    @staticmethod
    def _prompt_turns(question: str, images: int, context: Context,
                      at: list[int] | None = None) -> tuple[list, list[Place]]:
        turns, places = context
        return [*turns, (question, None)], [*places] + [(len(turns), o) for o in ([0] * images if at is None else at)]

    def encode_conversation(self, turns: list[tuple[str, str]],
                            places: list[Place] | None = None) -> tuple[list[int], list[int], int]:
        """Ids, labels (answers and their end-of-turn tokens) and the number of turns kept: turns
        past max_seq_len (counting each image's N placeholders) are dropped whole, with their images."""
        places = ONE_IMAGE if places is None else places
        messages, spans, text = self._messages(turns, places=places), [], ""
        for k in range(len(turns)):
            prompt = self.tok.render(messages[: 2 * k + 1], generation=True)
            full = self.tok.render(messages[: 2 * k + 2], generation=False)
            if not (prompt.startswith(text) and full.startswith(prompt)):
                raise UserError(f"{self.tok.tok.name_or_path}: its chat template does not render turns as "
                                "prefixes of one another, so answers cannot be located for the loss")
            spans.append((len(prompt), len(full)))
            text = full
        ids, offsets = self._encode(turns, False, text, places)
        labels = [i if any(s < end and start < e for s, e in spans) else IGNORE for i, (start, end) in zip(ids, offsets)]
        # Keep whole turns while the sequence (each image expanded) fits; always the first.
        cuts = [sum(1 for start, _ in offsets if start < e) for _, e in spans]  # tokens through turn k
        extra = [ids[:c].count(self.tok.image) * (self.num_image_tokens - 1) for c in cuts]
        kept = max([k + 1 for k in range(1, len(cuts)) if cuts[k] + extra[k] <= self.max_seq_len], default=1)
        return (*self._expand(ids[: cuts[kept - 1]], labels[: cuts[kept - 1]]), kept)


def _pieces(question: str, offsets: list[int]) -> list[tuple[str | None, int]]:
    """A question as (text, offset) pieces with (None, offset) for each image: the text before each
    image when there is some, and always the text after the last one (possibly empty)."""
    out, at = [], 0
    for offset in offsets:
        if offset > at:
            out.append((question[at:offset], at))
        out.append((None, offset))
        at = offset
    return out + [(question[at:], at)]
