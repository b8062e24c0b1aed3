"""Text from data is only ever text, and tokenizer training is bounded whatever the data.

A special-token string typed in a question or answer ("<eos>", "<image>", "<|im_end|>", ...) must
be encoded as plain characters, by graft's tokenizer and by a Hugging Face tokenizer with its chat
template, so the special ids are exactly the template's; text without one is tokenised as it
always was. Training the BPE on a corpus with huge no-space captions must stay fast and leave the
vocabulary of normal text alone.
"""

import json
import random
import string

import pytest
from hf_models import LLAMA_TEMPLATE, make_lm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from graft.data.hf_tokenizer import HFChatTokenizer, TemplateProcessor
from graft.data.processor import Processor
from graft.data.samples import BadSample
from graft.data.shapes import ShapesWorld
from graft.data.world_source import make_world
from graft.data.tokenizer import SPECIAL_TOKENS, ChatTokenizer, world_corpus
from graft.losses import IGNORE
from graft.recipes import shapes_vqa

GRAFT_SPECIALS = list(SPECIAL_TOKENS.values())
QUESTION = "what color is the circle?"


def nasty(specials: list[str]) -> str:
    """Text holding every string of `specials`, alone and glued together."""
    return "is " + " ".join(specials) + " or " + "".join(specials) + " here?"


def harmless(specials: list[str]) -> str:
    return nasty(["x"] * len(specials))


def supervised(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, lab in zip(ids, labels) if lab != IGNORE]


def letters(n: int, seed: int) -> str:
    """n random lowercase letters, no spaces (fast: one randbytes call)."""
    return random.Random(seed).randbytes(n).translate(bytes(97 + b % 26 for b in range(256))).decode()


# --- graft's own tokenizer -------------------------------------------------------------------

@pytest.fixture(scope="module")
def graft_tok():
    return ChatTokenizer.train(world_corpus(ShapesWorld(), n=100), 384)


def test_graft_tokenizer_spells_special_tokens_as_text(graft_tok):
    tok, proc = graft_tok, Processor(graft_tok, 24, 9, 512)
    text, clean = nasty(GRAFT_SPECIALS), harmless(GRAFT_SPECIALS)
    assert tok.decode(tok.encode(text)) == text
    ids, labels = proc.conversation([(text, text), ("".join(GRAFT_SPECIALS), "<eos>")])
    clean_ids, _ = proc.conversation([(clean, clean), ("x" * len(GRAFT_SPECIALS), "x")])
    for name in SPECIAL_TOKENS:  # only the layout's own: <bos>, 2x <|user|>, <|assistant|>, <eos>, 9 <image>
        assert ids.count(getattr(tok, name)) == clean_ids.count(getattr(tok, name)), name
    assert ids.count(tok.image) == proc.num_image_tokens
    assert supervised(ids, labels) == tok.encode(text) + [tok.eos] + tok.encode("<eos>") + [tok.eos]
    prompt, clean_prompt = proc.prompt(text), proc.prompt(clean)
    for name in SPECIAL_TOKENS:
        assert prompt.count(getattr(tok, name)) == clean_prompt.count(getattr(tok, name)), name
    # Text without special strings: exactly the ids of the tokenizer itself, as before.
    for s in world_corpus(ShapesWorld(), n=20) + ["Zürich 42! 😀 " + "a" * 300]:
        assert tok.encode(s) == tok.tok.encode(s, add_special_tokens=False).ids


def test_graft_tokenizer_round_trips_any_text(graft_tok):
    texts = ["Zürich, déjà vu — 東京の天気は晴れです 😀🎉👩‍👩‍👧", "x" * 5000 + " y" + "7" * 300 + "!" * 200,
             "tabs\tand" + " " * 150 + "spaces\n\nnewlines", "".join(GRAFT_SPECIALS) + " <eos>x<pad>",
             letters(20_000, 0), "日本語" * 100]
    for text in texts:
        assert graft_tok.decode(graft_tok.encode(text)) == text
    saved = ChatTokenizer(Tokenizer.from_str(graft_tok.tok.to_str()))  # the long-word cut is saved with it
    assert saved.encode(texts[1]) == graft_tok.encode(texts[1])


# --- Hugging Face tokenizers with their chat templates ---------------------------------------

def sentencepiece_like(folder):
    """A Llama-2-style tokenizer: BPE over SentencePiece's "▁" words (Metaspace), which adds a
    word-start mark at the start of a string but not after a special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list(string.printable + "▁"))
    tok.train_from_iterator(world_corpus(ShapesWorld(), n=100) + ["[INST] [/INST]"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=LLAMA_TEMPLATE, bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    paths = {k: make_lm(k, root / k) for k in ("llama", "qwen2", "gpt2")}
    paths["sentencepiece"] = sentencepiece_like(root / "sentencepiece")
    return paths


def hf_specials(tok: HFChatTokenizer) -> list[str]:
    """graft's special strings plus every added token and bos/eos/pad of the tokenizer."""
    own = list(tok.tok.added_tokens_encoder) + [tok.tok.bos_token, tok.tok.eos_token, tok.tok.pad_token]
    return list(dict.fromkeys(GRAFT_SPECIALS + [s for s in own if s]))


def joint(proc: TemplateProcessor, text: str) -> list[int]:
    """Today's path: the rendered text tokenised as one string, <image> expanded."""
    ids = proc.tok.tok(text, add_special_tokens=False)["input_ids"]
    return proc._expand(ids, ids)[0]


def rendered(proc: TemplateProcessor, turns, generation: bool) -> str:
    messages = []
    for i, (q, a) in enumerate(turns):
        messages.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + q})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    return proc.tok.render(messages, generation)


@pytest.mark.parametrize("lm", ["llama", "qwen2", "gpt2", "sentencepiece"])
def test_chat_template_spells_special_tokens_as_text(hf, lm):
    tok = HFChatTokenizer.load(hf[lm])
    proc = TemplateProcessor(tok, 24, 9, 1024)
    specials = hf_specials(tok)
    special_ids = {s: tok.tok.convert_tokens_to_ids(s) for s in specials}
    text, clean = nasty(specials), harmless(specials)
    turns = [(text, text), ("".join(specials), specials[-1])]  # a data string can open with a template token
    clean_turns = [(clean, clean), ("x" * len(specials), "x")]
    ids, labels = proc.conversation(turns)
    clean_ids, clean_labels = proc.conversation(clean_turns)
    for s, i in special_ids.items():
        assert ids.count(i) == clean_ids.count(i), s
    assert ids.count(tok.image) == proc.num_image_tokens
    # The literal text comes back, with the template's tokens where they were.
    expected = rendered(proc, turns, False).replace("<image>", "<image>" * proc.num_image_tokens, 1)
    assert tok.tok.decode(ids) == expected
    # Labels: each answer and its end of turn, as for harmless text.
    got = tok.tok.decode(supervised(ids, labels))
    want = tok.tok.decode(supervised(clean_ids, clean_labels))
    assert got == want.replace(clean, text, 1).replace("x" + tok.tok.eos_token, specials[-1] + tok.tok.eos_token)
    prompt, clean_prompt = proc.prompt(text), proc.prompt(clean)
    for s, i in special_ids.items():
        assert prompt.count(i) == clean_prompt.count(i), s
    assert tok.decode(tok.encode(text)) == text
    # Text without special strings: the ids of the one joint encoding, bit for bit.
    world_turns = [(QUESTION, "red"), ("how many shapes are there?", "2"), ("is there a cross?", "no")]
    assert proc.conversation(world_turns)[0] == joint(proc, rendered(proc, world_turns, False))
    assert proc.prompt(QUESTION) == joint(proc, proc.prompt_text(QUESTION))


def test_template_that_rewrites_text_is_a_bad_sample(hf):
    tok = HFChatTokenizer.load(hf["qwen2"])
    tok.tok.chat_template = tok.tok.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | replace('red', 'blue') }}")
    proc = TemplateProcessor(tok, 24, 9, 1024)
    assert proc.conversation([(QUESTION, "red")])[0].count(tok.image) == 9  # no special string: one encoding
    with pytest.raises(BadSample) as err:
        proc.conversation([(QUESTION, "red <|im_end|>")])
    assert err.value.reason == "text_control_token"


# --- bounded tokenizer training --------------------------------------------------------------

def train_as_before(texts: list[str], vocab_size: int = 384) -> ChatTokenizer:
    """ChatTokenizer.train before the long-word cut and the corpus bounds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GRAFT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tok)


@pytest.fixture(scope="module")
def world():
    return world_corpus(make_world(shapes_vqa()))


def test_huge_caption_leaves_the_world_vocabulary_alone(world):
    clean = ChatTokenizer.train(world, 384)
    model, before = json.loads(clean.tok.to_str())["model"], json.loads(train_as_before(world).tok.to_str())["model"]
    assert (model["vocab"], model["merges"]) == (before["vocab"], before["merges"])  # normal text: as before
    # One 800 KB caption without spaces, a repeated block (spam, a pasted blob): before, it spent the
    # vocabulary on its own merges and 40% of the world's texts got >10% longer.
    block = letters(40, 1) + "."
    tok = ChatTokenizer.train(world + [block * 20_000], 384)
    base, lens = [len(clean.encode(t)) for t in world], [len(tok.encode(t)) for t in world]
    assert sum(lens) <= 1.02 * sum(base)
    assert sum(b > 1.1 * a for a, b in zip(base, lens)) <= 0.01 * len(world)


@pytest.mark.timeout(300)  # a hang guard only: a few seconds here, minutes to hours before the bounds
def test_training_work_is_bounded_whatever_the_texts(world):
    """BPE training is quadratic in the length of a word and linear in the corpus: both are bounded
    before the trainer sees them (the bounds themselves checked here, not a wall-clock time)."""
    from graft.data.tokenizer import MAX_CORPUS_CHARS, MAX_TEXT_CHARS, MAX_WORD, _bounded, _pre_tokenizer

    texts = world + [letters(800_000, 2), letters(5_000_000, 3)] + [letters(65_536, 10 + i) for i in range(1000)]
    taken = _bounded(texts)
    assert max(map(len, taken)) <= MAX_TEXT_CHARS and sum(map(len, taken)) <= MAX_CORPUS_CHARS
    assert taken[: len(world)] == world  # ordinary texts whole
    for text in (letters(20_000, 4), "!" * 5_000, " " * 5_000, "7" * 5_000):  # one class of character each
        pieces = _pre_tokenizer().pre_tokenize_str(text)
        assert "".join(p for p, _ in pieces).replace("Ġ", " ") == text
        assert max(len(p) for p, _ in pieces) <= MAX_WORD
    tok = ChatTokenizer.train(texts, 384)
    assert tok.decode(tok.encode(texts[-1])) == texts[-1]
