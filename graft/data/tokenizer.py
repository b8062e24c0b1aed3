"""The tokenizer: a byte-level BPE (Hugging Face `tokenizers`) plus the chat's special tokens.

Trained in a fraction of a second on the built-in world's text, or loaded from a user's
`tokenizer.json`; every run saves the one it used next to its checkpoints. Byte-level means any
prompt a user types can be encoded, even words the world never used.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from graft.errors import UserError

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "image": "<image>",  # one per image feature; the VLM scatters image tokens here
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}


class ChatTokenizer:
    """Text ↔ ids, with the special-token ids as attributes (`.pad`, `.image`, `.eos`, ...)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        for name, token in SPECIAL_TOKENS.items():
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise UserError(f"tokenizer lacks the special token {token!r} (needed for '{name}')")
            setattr(self, name, token_id)

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: Path) -> "ChatTokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except (Exception,) as e:  # tokenizers raises a bare Exception on malformed JSON
            if isinstance(e, UserError):
                raise
            raise UserError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0][:80]})") from None

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "ChatTokenizer":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)


def world_corpus(world, n: int = 3000) -> list[str]:
    """Every kind of text the world produces, from its first `n` training samples."""
    from graft.data.shapes import CAPTION_PROMPT

    texts = [CAPTION_PROMPT]
    for i in range(n):
        s = world.sample("train", i)
        texts.append(s.caption)
        for qa in s.qa:
            texts += [qa.question, qa.answer]
    return texts

