"""Tokenizer round trip, chat layout, loss masking, image loading from any mode and format."""

import io

import pytest
import torch
from PIL import Image

from graft.data.processor import collate, load_image
from graft.data.tokenizer import SPECIAL_TOKENS, ChatTokenizer
from graft.errors import UserError
from graft.losses import IGNORE
from tests.helpers import tiny_vlm, tokenizer


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    tok = tokenizer()
    for text in ["what color is the cross?", "a large red circle and a small blue square", "Zürich 42!"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("what color is the circle?")) <= 8  # world words are whole tokens
    ids = {getattr(tok, name) for name in SPECIAL_TOKENS}
    assert len(ids) == len(SPECIAL_TOKENS)
    tok.save(tmp_path / "t.json")
    again = ChatTokenizer.load(tmp_path / "t.json")
    assert again.encode("is there a red square?") == tok.encode("is there a red square?")
    assert again.image == tok.image


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ChatTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        ChatTokenizer.load(bad)


def test_conversation_labels_cover_answers_only():
    _, proc = tiny_vlm()
    tok = proc.tok
    ids, labels = proc.conversation([("what color is the circle?", "red"), ("how many objects are there?", "2")])
    assert ids.count(tok.image) == proc.num_image_tokens
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert supervised == tok.encode("red") + [tok.eos] + tok.encode("2") + [tok.eos]
    assert all(l == IGNORE or l == i for i, l in zip(ids, labels))
    # the prompt for generation is exactly the conversation's prefix up to the answer
    prompt = proc.prompt("what color is the circle?")
    assert ids[: len(prompt)] == prompt


def test_conversation_drops_whole_turns_past_max_len():
    _, proc = tiny_vlm()
    proc.max_seq_len = proc.num_image_tokens + 14
    turns = [("what color is the circle?", "red")] * 5
    ids, labels = proc.conversation(turns)
    assert len(ids) <= proc.max_seq_len and ids.count(proc.tok.image) == proc.num_image_tokens
    assert ids[-1] == proc.tok.eos


def test_collate_pads_right_and_masks_padding():
    _, proc = tiny_vlm()
    a = proc.conversation([("what color is the circle?", "red")])
    b = proc.conversation([("what color is the circle?", "red"), ("is there a red square?", "no")])
    pix = torch.zeros(3, 32, 32)
    batch = collate([(*a, pix), (*b, pix)], proc.tok.pad)
    assert batch["input_ids"].shape == (2, len(b[0]))
    assert (batch["input_ids"][0, len(a[0]):] == proc.tok.pad).all()
    assert (batch["labels"][0, len(a[0]):] == IGNORE).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")])
def test_any_image_mode_loads_and_resizes(tmp_path, mode, fmt):
    img = Image.new("RGB", (50, 30), (200, 40, 40)).convert(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt)
    _, proc = tiny_vlm()
    x = proc.pixels(load_image(path))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_transparent_pixels_become_black():
    _, proc = tiny_vlm()
    img = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    assert torch.allclose(proc.pixels(img), torch.full((3, 32, 32), -1.0))


def test_non_image_and_missing_files_are_user_errors(tmp_path):
    html = tmp_path / "page.jpg"
    html.write_text("<html><body>not an image</body></html>")
    with pytest.raises(UserError, match="page.jpg"):
        load_image(html)
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "nope.png")
    trunc = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    trunc.write_bytes(buf.getvalue()[:40])
    with pytest.raises(UserError, match="cut.png"):
        load_image(trunc)
