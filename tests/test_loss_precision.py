"""Losses keep the precision they are given (DESIGN.md §2): at least fp32, fp64 stays fp64, so
`torch.autograd.gradcheck` can check each one, chunked variants included."""

import pytest
import torch
from torch.autograd import gradcheck

from graft.losses import IGNORE, clip_loss, lm_loss, siglip_loss


def _features(n=6, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1) for _ in range(2))
    return x.requires_grad_(), y.requires_grad_()


@pytest.mark.parametrize("chunk", [0, 4])
def test_contrastive_losses_pass_gradcheck_in_fp64(chunk):
    x, y = _features()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert clip_loss(x, y, scale, chunk_size=chunk).dtype == torch.float64
    assert siglip_loss(x, y, scale, bias, chunk_size=chunk).dtype == torch.float64
    assert gradcheck(lambda a, b, s: clip_loss(a, b, s, chunk_size=chunk), (x, y, scale))
    assert gradcheck(lambda a, b, s, t: siglip_loss(a, b, s, t, chunk_size=chunk), (x, y, scale, bias))


def test_lm_loss_passes_gradcheck_in_fp64_and_ignores_unlabelled_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, IGNORE, IGNORE]])
    assert lm_loss(logits, labels).dtype == torch.float64
    assert gradcheck(lambda z: lm_loss(z, labels), (logits,))


def test_lower_precision_is_raised_to_fp32_never_kept():
    x, y = (t.detach().to(torch.bfloat16) for t in _features(dtype=torch.float32))
    scale, bias = torch.tensor(3.0), torch.tensor(-1.5)
    assert clip_loss(x, y, scale).dtype == torch.float32
    assert siglip_loss(x, y, scale, bias).dtype == torch.float32
    assert lm_loss(torch.randn(1, 3, 5).to(torch.bfloat16), torch.tensor([[IGNORE, 1, 2]])).dtype == torch.float32
    # and fp32 stays fp32 with the same value as before the fp64 path existed
    x32, y32 = (t.detach() for t in _features(dtype=torch.float32))
    x64, y64 = x32.double(), y32.double()
    assert clip_loss(x32, y32, scale).item() == pytest.approx(clip_loss(x64, y64, scale.double()).item(), rel=1e-6)
