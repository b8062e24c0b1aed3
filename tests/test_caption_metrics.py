"""Caption metrics on small examples computed by hand (pycocoevalcap's scorers behind them)."""

import pytest

from graft.eval.captioning import bleu4, cider, rouge_l, tokenize

A, B = "a small red circle left of a cross", "two large blue squares and one green triangle"


def test_cider_d_on_a_known_example():
    # CIDEr-D = 10 x mean over n = 1..4 of the tf-idf cosine (Gaussian length penalty, clipped
    # counts): an exact match scores 10, a caption sharing no n-gram with its reference 0, and the
    # corpus figure is the mean over images. Two images, so every n-gram of one caption has idf log 2.
    assert cider([A, B], [[A], [B]]) == pytest.approx(10.0)
    assert cider([A, "zebra zebra zebra zebra"], [[A], [B]]) == pytest.approx(5.0)
    assert cider(["zebra zebra zebra zebra", "yak yak yak yak"], [[A], [B]]) == pytest.approx(0.0)


def test_bleu4_and_rouge_l_on_known_examples():
    assert bleu4([A, B], [[A], [B]]) == pytest.approx(1.0)
    # LCS("w x y z", "w y z v") = "w y z": precision = recall = 3/4, so F (any beta) = 3/4
    assert rouge_l(["w x y z"], [["w y z v"]]) == pytest.approx(0.75)
    # several references: the best one counts
    assert rouge_l(["w x y z"], [["q q q q", "w x y z"]]) == pytest.approx(1.0)
    assert tokenize("A Small, red circle.") == "a small red circle"
