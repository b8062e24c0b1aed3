"""Hugging Face tokenizers and chat templates: for `lm.hf_path` runs, and for exporting graft's own.

`HFChatTokenizer` gives an `AutoTokenizer` loaded from a folder the interface of `ChatTokenizer`
(`.pad`, `.eos`, `.image`, `encode`, `decode`, `len`, `save`), adding an `<image>` special token
if the tokenizer lacks one (the LM's embeddings are resized to match).

`TemplateProcessor` renders conversations with the tokenizer's own chat template (or
`FALLBACK_TEMPLATE` when it has none). The image goes at the start of the first user message as
one `<image>` followed by a newline (LLaVA's layout); after tokenisation that one id becomes N
placeholders, exactly what `transformers.LlavaProcessor` does to the text. The whole
conversation is tokenised as one string, and labels are set on the tokens that overlap the
characters of an assistant reply (found by rendering the conversation turn by turn), so training
sees the same tokens inference does.

`GRAFT_TEMPLATE` reproduces `Processor`'s built-in layout exactly; export attaches it to graft's
own tokenizer so that `AutoProcessor` builds the same input ids as graft.
"""

from __future__ import annotations

from pathlib import Path

from graft.data.processor import Processor
from graft.errors import UserError
from graft.losses import IGNORE

IMAGE_TOKEN = "<image>"

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

    @classmethod
    def load(cls, path: str | Path, key: str = "tokenizer") -> "HFChatTokenizer":
        """AutoTokenizer from a local folder, plus <image> and a chat template if missing;
        errors name `key` (the config key that gave the folder)."""
        from tokenizers import AddedToken
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
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def render(self, messages: list[dict], generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def save(self, folder: Path) -> None:
        self.tok.save_pretrained(str(folder))


class TemplateProcessor(Processor):
    """Processor whose text side is the tokenizer's chat template (pixels as in `Processor`)."""

    tok: HFChatTokenizer

    def _user(self, question: str, first: bool) -> dict:
        return {"role": "user", "content": (IMAGE_TOKEN + "\n" if first else "") + question}

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Each <image> id becomes num_image_tokens placeholders (unsupervised)."""
        out_ids, out_labels = [], []
        for i, lab in zip(ids, labels):
            n = self.num_image_tokens if i == self.tok.image else 1
            out_ids += [i] * n
            out_labels += [lab if n == 1 else IGNORE] * n
        return out_ids, out_labels

    def prompt_text(self, question: str) -> str:
        return self.tok.render([self._user(question, True)], generation=True)

    def prompt(self, question: str) -> list[int]:
        ids = self.tok.encode(self.prompt_text(question))
        return self._expand(ids, ids)[0]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Ids and labels (answers and their end-of-turn tokens); turns past max_seq_len are dropped."""
        messages, spans, text = [], [], ""
        for i, (question, answer) in enumerate(turns):
            messages.append(self._user(question, i == 0))
            prompt = self.tok.render(messages, generation=True)
            messages.append({"role": "assistant", "content": answer})
            full = self.tok.render(messages, generation=False)
            if not (prompt.startswith(text) and full.startswith(prompt)):
                raise UserError(f"{self.tok.tok.name_or_path}: its chat template does not render turns as "
                                "prefixes of one another, so answers cannot be located for the loss")
            spans.append((len(prompt), len(full)))
            text = full
        enc = self.tok.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [i if any(s < end and start < e for s, e in spans) else IGNORE for i, (start, end) in zip(ids, offsets)]
        # Keep whole turns while the sequence (with the image expanded) fits; always the first.
        extra = self.num_image_tokens - 1
        cuts = [sum(1 for start, _ in offsets if start < e) for _, e in spans]  # tokens through turn k
        keep = max([c for c in cuts[1:] if c + extra <= self.max_seq_len], default=cuts[0])
        return self._expand(ids[:keep], labels[:keep])
