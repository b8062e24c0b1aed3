"""Packing: several conversations per row give each one the logits, and the batch the loss and
gradients, of the padded batch (prefix VLM, and Flamingo whose tokens must see only their own
conversation's images)."""

import pytest
import torch

from graft.data.packing import first_fit, pack
from graft.data.processor import collate
from graft.data.shapes import ShapesWorld
from graft.losses import IGNORE, batch_loss
from graft.trainer.flops import causal_context, vlm_step_flops
from tests.helpers import tiny_vlm
from tests.test_flamingo import open_gates, tiny_flamingo


def _flamingo(attend: str):
    model, proc = tiny_flamingo(attend)
    open_gates(model)  # closed gates would hide the images, and with them any leak across conversations
    return model.train(), proc


BUILDERS = {"vlm": tiny_vlm, "flamingo_previous": lambda: _flamingo("previous"), "flamingo_all": lambda: _flamingo("all")}


def conversations(proc, n):
    w = ShapesWorld(image_size=32)
    items = []
    for i in range(n):
        s = w.sample("train", i)
        turns = [(qa.question, qa.answer) for qa in s.qa[: 1 + i % 5]]  # lengths differ
        ids, labels = proc.conversation(turns)
        items.append((ids, labels, proc.pixels(s.image)))
    return items


def test_first_fit_fills_rows_without_overflow():
    lengths = [70, 30, 50, 20, 90, 10, 40]
    rows = first_fit(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert rows == [[4, 5], [0, 1], [2, 6], [3]]  # longest first: 90+10, 70+30, 50+40, then 20
    assert first_fit([150], 100) == [[0]]  # too long for a row: a row of its own


@pytest.mark.parametrize("design", list(BUILDERS))
def test_packed_batch_matches_padded_batch(design):
    torch.manual_seed(0)
    model, proc = BUILDERS[design]()
    items = conversations(proc, 7)
    padded, packed = collate(items, proc.tok.pad), pack(items, proc.tok.pad, max_len=128)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: it packed
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int((packed["labels"] != IGNORE).sum()) == int((padded["labels"] != IGNORE).sum())

    logits_pad, _ = model(**padded)
    loss_pad = batch_loss(model, padded)
    loss_pad.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads_pad = [p.grad.clone() for p in params]
    model.zero_grad()
    logits_pack, _ = model(**packed)
    loss_pack = batch_loss(model, packed)
    loss_pack.backward()
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
    for g_pad, p in zip(grads_pad, params):
        torch.testing.assert_close(p.grad, g_pad, rtol=1e-4, atol=1e-6)

    # every conversation's logits, found in its packed row, equal its padded logits
    rows = first_fit([len(ids) for ids, _, _ in items], 128)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(items[i][0])
            torch.testing.assert_close(logits_pack[r, at:at + n], logits_pad[i, :n], rtol=1e-4, atol=1e-5)
            assert packed["position_ids"][r, at] == 0
            at += n


def test_mfu_counts_the_same_attention_work_packed_or_padded():
    # Each token attends to its own conversation's earlier tokens only: n(n+1)/2 per conversation,
    # whether the conversations are padded to one width or packed several to a row.
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    items = conversations(proc, 7)
    padded, packed = collate(items, proc.tok.pad), pack(items, proc.tok.pad, max_len=128)
    expected = sum(len(ids) * (len(ids) + 1) // 2 for ids, _, _ in items)
    assert causal_context(padded["input_ids"], proc.tok.pad) == expected
    assert causal_context(packed["input_ids"], proc.tok.pad, packed["position_ids"]) == expected
    tokens = sum(len(ids) for ids, _, _ in items)
    assert vlm_step_flops(model, 7, tokens, expected) > vlm_step_flops(model, 7, tokens, 0)
