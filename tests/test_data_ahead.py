"""The built-in world's batches are made a step ahead on a thread (data/loader.py IndexedBatches):
they are the batches made in turn, in any order asked, with the same counts; an unusable step still
stops the run in one line. Texts the tokenizer has seen are encoded from a cache: the same ids."""

import pytest
import torch

from graft.build import build_stream
from graft.config_checks import apply_overrides
from graft.data.check import processor_for
from graft.data.packing import WIDTH_STEP, pack
from graft.data.shapes import ShapesWorld
from graft.data.stream import IndexedStream
from graft.errors import UserError
from graft.recipes import tiny
from graft.trainer.runtime import Runtime
from tests.helpers import tokenizer


def _batches(overrides):
    cfg = apply_overrides(tiny(), overrides)
    proc = processor_for(cfg)
    ahead = build_stream(cfg, proc, Runtime(torch.device("cpu"), torch.float32))
    in_turn = IndexedStream(ahead.stream.source, proc, cfg, packs=ahead.stream.packs)
    return ahead, in_turn


@pytest.mark.parametrize("accum", [1, 2])
def test_batches_made_ahead_are_those_made_in_turn_with_their_counts(accum):
    # 40 tokens per row: long conversations lose turns, so every batch carries notes to count
    ahead, in_turn = _batches([f"train.grad_accum={accum}", "lm.max_seq_len=40", "data.questions_per_image=6"])
    notes = 0
    for step, micro in [(0, 0), (0, accum - 1), (1, 0), (5, 0), (3, 0), (4, 0)]:  # in order, and not
        got, want = ahead.batch(step, micro), in_turn.batch(step, micro)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (step, micro, key)
        notes += sum(in_turn.log.take()[1].values())
    assert notes > 0 and sum(ahead.notes.values()) == notes  # only served batches are counted
    ahead.close()


def test_a_step_with_no_usable_record_still_stops_in_one_line():
    ahead, _ = _batches(["lm.max_seq_len=8"])  # no conversation's first turn fits
    with pytest.raises(UserError, match="none of the 16 records"):
        ahead.batch(0, 0)
    assert sum(ahead.skipped.values()) == 16  # counted before it stopped
    ahead.close()


def test_packed_rows_are_padded_to_a_multiple_of_the_width_step_within_max_len():
    tok = tokenizer()
    items = [([tok.bos] * n, [0] * n, torch.zeros(3, 8, 8)) for n in (50, 30, 20)]
    assert pack(items, tok.pad, max_len=200)["input_ids"].shape == (1, WIDTH_STEP * 2)  # 100 -> 128
    assert pack(items, tok.pad, max_len=110)["input_ids"].shape == (1, 110)  # not past max_len
    assert pack(items[:1], tok.pad, max_len=40)["input_ids"].shape == (1, 50)  # a longer item keeps its length


def test_cached_encoding_gives_the_tokenizers_ids_and_cannot_be_changed_by_a_caller():
    tok = tokenizer()
    texts = [qa.question for i in range(20) for qa in ShapesWorld().sample("train", i).qa] + ["x" * 300]
    for text in texts + texts:  # the second pass reads the cache (the last text is too long for it)
        assert tok.encode(text) == tok._plain.encode(text, add_special_tokens=False).ids
    ids = tok.encode(texts[0])
    ids.append(-1)
    assert tok.encode(texts[0]) == tok._plain.encode(texts[0], add_special_tokens=False).ids
