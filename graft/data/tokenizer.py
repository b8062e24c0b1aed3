"""The tokenizer: a byte-level BPE (Hugging Face `tokenizers`) plus the chat's special tokens.

Trained in a fraction of a second on the built-in world's text, or loaded from a user's
`tokenizer.json`; every run saves the one it used next to its checkpoints. Byte-level means any
prompt a user types can be encoded, even words the world never used.

Text is only ever text: `encode` spells a literal "<eos>" or "<image>" in a caption as plain
characters, so the special ids come only from the chat layout the processor writes (a caption
could otherwise end an answer early or add image placeholders with no image behind them).

Training cost is bounded whatever the data. BPE training costs about the square of the longest
word, so one 800 KB caption without spaces took minutes, and a huge or repetitive text can spend
the whole small vocabulary on its own merges. So (a) while training, the pre-tokenizer cuts runs
of more than `MAX_WORD` letters, digits, symbols or spaces into `MAX_WORD`-character pieces (words
of normal text are far shorter and tokenise exactly as with plain byte-level BPE; the saved
tokenizer is plain byte-level BPE, and what it encodes is bounded by data.max_text_bytes: 40 ms for
64 KiB without a space), and (b) `train` reads at most `MAX_TEXT_CHARS` of each text and
`MAX_CORPUS_CHARS` in all.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from graft.data.documents import document
from graft.data.shapes import CAPTION_PROMPT
from graft.errors import UserError

KNOWN_TEXTS, KNOWN_CHARS = 1 << 16, 256  # the encode cache: at most 16 Mi characters

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "image": "<image>",  # one per image feature; the VLM scatters image tokens here
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
MAX_WORD = 64  # characters; longer runs of one character class are cut (BPE training is quadratic in it)
MAX_TEXT_CHARS = 8192  # of each training text: one huge or repetitive caption cannot buy many merges
MAX_CORPUS_CHARS = 8 << 20  # in all: ~5 s of BPE training on one core at worst (random letters)


class ChatTokenizer:
    """Text ↔ ids, with the special-token ids as attributes (`.pad`, `.image`, `.eos`, ...)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        for name, token in SPECIAL_TOKENS.items():
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise UserError(f"tokenizer lacks the special token {token!r} (needed for '{name}')")
            setattr(self, name, token_id)
        # A copy that spells special tokens as text, for `encode` (the flag is not saved; `tok` itself
        # keeps matching them, as the exported HF tokenizer must when it reads a rendered chat).
        self._plain = Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self._known: dict[str, tuple[int, ...]] = {}  # short texts already encoded (see `encode`)

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def placeholder(self, token: str) -> int:
        """The id of a modality's placeholder token beyond `<image>` (e.g. `<series>`), which only
        tokenizers trained for that modality hold (`train(..., extra=...)`)."""
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise UserError(f"the tokenizer has no {token} token: it was not trained for this modality's data")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: a literal special token in it is spelled out, never its id.

        Short texts recur (a world's questions and answers, a dataset's prompts): their ids are kept,
        at most KNOWN_TEXTS of at most KNOWN_CHARS characters each (the dict starts over when full)."""
        if len(text) > KNOWN_CHARS:
            return self._plain.encode(text, add_special_tokens=False).ids
        ids = self._known.get(text)
        if ids is None:
            if len(self._known) >= KNOWN_TEXTS:
                self._known.clear()
            ids = self._known[text] = tuple(self._plain.encode(text, add_special_tokens=False).ids)
        return list(ids)

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
    def train(cls, texts: list[str], vocab_size: int, extra: tuple[str, ...] = ()) -> "ChatTokenizer":
        """A byte-level BPE on the start of `texts` (see the module docstring for the bounds), with
        the chat's special tokens and the `extra` ones (another modality's placeholder)."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = _pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()) + list(extra),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_bounded(texts), trainer=trainer)
        # Encoding needs no cut: a text is at most data.max_text_bytes by then, and the cut costs
        # about 1.4 us per text (the pipeline's records/s were 4 % lower with it).
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        return cls(tok)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split, after cutting runs of MAX_WORD letters, digits, symbols or spaces."""
    classes = [r"\p{L}", r"\p{N}", r"[^\s\p{L}\p{N}]", r"\s"]  # ByteLevel's own word classes
    long_run = Regex("|".join(f"{c}{{{MAX_WORD}}}" for c in classes))
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(long_run, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def _bounded(texts: list[str]) -> list[str]:
    """The first MAX_TEXT_CHARS of each text, until MAX_CORPUS_CHARS are taken."""
    out, total = [], 0
    for text in texts:
        if total >= MAX_CORPUS_CHARS:
            break
        out.append(text[: min(MAX_TEXT_CHARS, MAX_CORPUS_CHARS - total)])
        total += len(out[-1])
    return out


def world_corpus(world, n: int = 3000, images_per_doc: int = 1) -> list[str]:
    """Every kind of text the world produces, from its first `n` training samples (and, with
    `images_per_doc` > 1, the turns of the documents they make, data/documents.py)."""
    texts = [CAPTION_PROMPT]
    for i in range(n):
        text, questions = world.text("train", i)
        texts.append(text)
        for qa in questions:
            texts += [qa.question, qa.answer]
    for i in range(n // images_per_doc if images_per_doc > 1 else 0):
        texts += [t for turn in document(world, "train", i, images_per_doc, 1, 0.0).turns for t in turn]
    return texts

