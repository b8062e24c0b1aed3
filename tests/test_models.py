"""Tiny-config model tests: shapes, splicing, placeholder checks, loss masking, freezing, generation."""

import pytest
import torch

from graft.losses import IGNORE, batch_loss, lm_loss
from tests.helpers import tiny_vlm


def batch(proc, n=2):
    convs = [proc.conversation([("what color is the circle?", "red")]) for _ in range(n)]
    ids = torch.tensor([c[0] for c in convs])
    labels = torch.tensor([c[1] for c in convs])
    return ids, labels, torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forward_shapes_and_loss(kind):
    torch.manual_seed(0)
    model, proc = tiny_vlm(kind)
    ids, labels, pix = batch(proc)
    logits, _ = model(ids, pix, labels)
    loss = batch_loss(model, {"input_ids": ids, "pixel_values": pix, "labels": labels})
    assert logits.shape == (2, ids.shape[1], model.lm.cfg.vocab_size)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.vision.embeddings.patch_embedding.weight.grad is not None


def test_image_features_land_at_placeholders():
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    ids, _, pix = batch(proc)
    embeds = model.embed(ids, pix)
    expected = model.connector(model.vision.features(pix))
    slots = ids == proc.tok.image
    assert torch.equal(embeds[slots].view_as(expected), expected)
    assert torch.equal(embeds[~slots], model.lm.embed_tokens(ids)[~slots])


def test_placeholder_mismatch_fails_with_both_counts():
    model, proc = tiny_vlm()
    ids, _, pix = batch(proc)
    ids[0, 3] = proc.tok.encode("red")[0]  # remove one placeholder
    n = model.num_image_tokens
    with pytest.raises(ValueError, match=f"{2 * n - 1} placeholder tokens.*{2 * n} image features"):
        model(ids, pix)


def test_placeholder_mismatch_fails_inside_a_compiled_forward_too():
    """Compiled, the check is an assertion inside the graph (no host sync, no graph break). Dynamo
    traces it whatever the backend; aot_eager runs the traced graph without inductor's code
    generation (~25 s of C++ compiling here; test_parallel.py trains through inductor itself)."""
    model, proc = tiny_vlm()
    ids, _, pix = batch(proc)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(ids, pix)  # the right count passes
    ids[0, 3] = proc.tok.encode("red")[0]
    with pytest.raises(RuntimeError, match="image placeholders and image features differ"):
        compiled(ids, pix)


def test_loss_ignores_everything_but_answers():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 7, IGNORE]])
    expected = -(torch.log_softmax(logits[0, 2], -1)[4] + torch.log_softmax(logits[0, 3], -1)[7]) / 2
    assert torch.allclose(lm_loss(logits, labels), expected)
    # changing a prompt position's logits does not change the loss
    logits2 = logits.clone()
    logits2[0, 0] += 5
    assert torch.allclose(lm_loss(logits2, labels), expected)
    assert lm_loss(logits, torch.full((1, 6), IGNORE)).item() == 0.0


def test_freeze_parts():
    model, proc = tiny_vlm()
    model.freeze(["vision", "lm"])
    ids, labels, pix = batch(proc)
    batch_loss(model, {"input_ids": ids, "pixel_values": pix, "labels": labels}).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())


def test_cached_greedy_generation_matches_full_recompute():
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    model.eval()
    ids = torch.tensor([proc.prompt("what color is the circle?")] * 3)
    pix = torch.randn(3, 3, 32, 32)
    eos = proc.tok.eos
    got = model.generate(ids, pix, max_new_tokens=6, eos_id=eos)
    for row in range(3):  # recompute each token with a full forward, no cache
        seq = ids[row : row + 1]
        expected = []
        for _ in range(6):
            logits, _ = model(seq, pix[row : row + 1])
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            expected.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        assert got[row] == expected


def test_weight_decay_groups():
    # Matrices decay (embedding tables included); norms and biases do not.
    from graft.trainer.optim import param_groups

    model, _ = tiny_vlm()
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.vision.embeddings.position_embedding.weight) in decay
    assert id(model.lm.embed_tokens.weight) in decay and id(model.connector.linear_1.weight) in decay
    assert id(model.lm.norm.weight) in no_decay
    assert all(p.ndim >= 2 for p in model.parameters() if id(p) in decay)
    assert not {names[i] for i in decay} & {n for n, p in model.named_parameters() if "norm" in n or n.endswith("bias")}


def test_fused_adamw_is_the_default_and_updates_like_torchs_default():
    """optim.fused: one fused kernel (default) or torch's multi-tensor AdamW; same update."""
    from graft.config import OptimConfig
    from graft.trainer.optim import build_optimizer

    torch.manual_seed(0)
    model, proc = tiny_vlm()
    ids, labels, pix = batch(proc)
    after = {}
    for fused in (True, False):
        copy = tiny_vlm()[0]
        copy.load_state_dict(model.state_dict())
        opt = build_optimizer(copy, OptimConfig(fused=fused))
        assert bool(opt.defaults["fused"]) is fused
        for _ in range(3):
            opt.zero_grad()
            batch_loss(copy, {"input_ids": ids, "labels": labels, "pixel_values": pix}).backward()
            opt.step()
        after[fused] = copy.state_dict()
    assert not torch.equal(after[True]["lm.norm.weight"], model.state_dict()["lm.norm.weight"])
    for name, value in after[True].items():
        torch.testing.assert_close(value, after[False][name], rtol=1e-5, atol=1e-5)  # updates: 6e-3


def test_answers_only_gives_the_same_loss_and_gradients_with_fewer_flops():
    """The trainer's path (`answers_only`, the VLM designs' `train_inputs`): the LM head and loss
    only where an answer token is predicted — the loss and every gradient equal the full path's;
    the head's FLOPs shrink."""
    from graft.objectives import StepLosses
    from graft.trainer.flops import count_step

    torch.manual_seed(0)
    model, proc = tiny_vlm()
    ids, labels, pix = batch(proc, 3)
    grads, losses, flops = [], [], []
    for flag in (False, True):
        model.zero_grad()
        logits, named = model(ids, pix, labels, answers_only=flag)
        assert (logits is None) == flag
        named["lm"].backward()
        losses.append(named["lm"].detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        flops.append(count_step(model, {"input_ids": ids, "pixel_values": pix, "labels": labels}, StepLosses(
            model, inputs={"answers_only": flag})))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert grads[1].keys() == grads[0].keys() and len(grads[0]) > 10
    top = max(g.abs().max().item() for g in grads[0].values())
    for name, want in grads[0].items():
        # The same sums in another order (the head over 8 positions instead of all, then the fp32
        # reductions back through every layer): measured up to ~3e-7 of a tensor's largest element
        # on AVX-512 and AVX2 CPUs. A lost or doubled position moves a gradient by far more. A key
        # bias's gradient is zero in exact arithmetic (softmax ignores a shift of a query's scores),
        # so its fp32 value is rounding noise of every order: its scale is floored at 1e-3 of the
        # model's largest gradient (two threads on an AMD EPYC of family 25 failed without it).
        scale = max(want.abs().max().item(), 1e-3 * top)
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-5 * scale, msg=name)
    head = 2 * model.lm.lm_head.weight.numel() * 3  # per position: forward, input and weight gradients
    assert flops[0] - flops[1] == head * (ids.numel() - int((labels[:, 1:] != IGNORE).sum()))
