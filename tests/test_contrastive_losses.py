"""graft's CLIP and SigLIP losses against the papers' formulas: values and every gradient, with
and without chunking; and on 2 processes (torchrun, gloo) against 1 process with the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contrastive_reference import clip_textbook, inputs, siglip_textbook
from graft.losses import clip_loss, siglip_loss


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk", [0, 3])
def test_clip_loss_matches_the_paper_formula(chunk):
    x, y, scale, _ = inputs(7, 5, seed=0)
    want, want_g = _grads(clip_textbook, x, y, scale)
    # graft computes in fp32: compare at fp32 precision
    got, got_g = _grads(lambda a, b, s: clip_loss(a, b, s, chunk_size=chunk), x.float(), y.float(), scale.float())
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    for g, w in zip(got_g, want_g):
        assert torch.allclose(g.double(), w, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 2])
def test_siglip_loss_matches_the_paper_formula(chunk):
    x, y, scale, bias = inputs(6, 4, seed=1)
    want, want_g = _grads(siglip_textbook, x, y, scale, bias)
    got, got_g = _grads(lambda a, b, s, c: siglip_loss(a, b, s, c, chunk_size=chunk),
                        x.float(), y.float(), scale.float(), bias.float())
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    for g, w in zip(got_g, want_g):
        assert torch.allclose(g.double(), w, atol=1e-5)


def test_perfect_alignment_gives_low_loss_and_shuffling_raises_it():
    x, _, _, _ = inputs(16, 32, seed=2, dtype=torch.float32)
    scale = torch.tensor(50.0)
    aligned = clip_loss(x, x, scale)
    shuffled = clip_loss(x, x.roll(1, 0), scale)
    assert aligned < 0.05 < 2.0 < shuffled


@pytest.mark.slow  # starts processes
def test_two_processes_equal_one_process(tmp_path):
    script = Path(__file__).parent / "scripts" / "contrastive_losses_dist.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # one line per (loss, chunking) case from each rank
    assert done.stdout.count("OK") == 2 * 4, done.stdout
