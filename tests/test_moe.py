"""Sparse mixture-of-experts FFNs (graft/models/moe.py): routing, modality-aware routing, the
balancing loss and the auxiliary-loss-free bias, active-parameter FLOPs, and a run through the CLI."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graft.cli import main
from graft.errors import UserError
from graft.models.decoder import Context, LanguageModel, LMConfig
from graft.models.moe import MoE


def lm_cfg(**moe) -> LMConfig:
    return LMConfig(vocab_size=50, hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate_size=32,
                    **{f"moe_{k}": v for k, v in moe.items()})


def ctx(modality_ids=None) -> Context:
    return Context(None, None, modality_ids=modality_ids)


def test_each_token_is_the_weighted_sum_of_its_chosen_experts():
    torch.manual_seed(0)
    moe = MoE(lm_cfg(experts=4, top_k=2))
    x = torch.randn(3, 5, 16)
    out = moe(x, ctx())
    chosen, weights, _ = moe.route(x.reshape(-1, 16), None)
    flat = x.reshape(-1, 16)
    want = torch.stack([sum(w * moe.experts[int(e)](flat[n]) for e, w in zip(chosen[n], weights[n]))
                        for n in range(flat.shape[0])])
    torch.testing.assert_close(out.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(15))


def test_modality_aware_routing_keeps_image_and_text_tokens_apart():
    torch.manual_seed(0)
    moe = MoE(lm_cfg(experts=4, top_k=1, routing="aware"))
    modality = torch.tensor([[1, 1, 0, 0, 1, 0]])
    chosen, _, probs = moe.route(torch.randn(6, 16), modality)
    image = modality.reshape(-1) == 1
    assert (chosen[image] < 2).all() and (chosen[~image] >= 2).all()
    assert (probs[image][:, 2:] == 0).all() and (probs[~image][:, :2] == 0).all()
    agnostic = MoE(lm_cfg(experts=4, top_k=1))
    agnostic.load_state_dict(moe.state_dict())
    assert agnostic.route(torch.randn(64, 16), modality.repeat(1, 11)[:, :64])[0].unique().numel() > 2


def test_expert_loads_report_the_routed_shares_since_the_last_call():
    """With modality-aware top-2 routing over 4 experts an image token takes both image experts, a
    text token both text experts: the shares follow the image fraction exactly."""
    from graft.models.moe import expert_loads

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([MoE(lm_cfg(experts=4, top_k=2, routing="aware"))])
    modality = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])  # 3 image tokens of 8
    model.layers[0](torch.randn(1, 8, 16), ctx(modality))
    model.layers[0].eval()
    model.layers[0](torch.randn(1, 8, 16), ctx(modality))  # evaluation is not counted
    loads = expert_loads(model)
    assert loads["moe/load/0"] == [3 / 16, 3 / 16, 5 / 16, 5 / 16] and loads["moe/max_load"] == 5 / 4
    assert expert_loads(model)["moe/load/0"] == [0.0] * 4  # counted anew after each call
    assert expert_loads(torch.nn.Linear(2, 2)) == {}


def test_the_balancing_loss_is_one_when_balanced_and_the_expert_count_when_collapsed():
    x = torch.randn(40, 16)
    moe = MoE(lm_cfg(experts=4, top_k=1))
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities
    c = ctx()
    moe(x[None], c)
    assert c.aux["moe_balance"].item() == pytest.approx(1.0 * 40)  # a local sum over 40 tokens
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 50.0  # every token prefers expert 0
    c = ctx()
    moe(x.abs()[None], c)
    assert c.aux["moe_balance"].item() == pytest.approx(4.0 * 40, rel=1e-3)


def test_the_bias_spreads_a_collapsed_router_without_a_loss():
    torch.manual_seed(0)
    moe = MoE(lm_cfg(experts=4, top_k=1, balance="bias", bias_rate=0.05))
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # a preference for expert 0
    x = torch.randn(1, 200, 16)

    def loads():
        return torch.bincount(moe.route(x[0], None)[0].reshape(-1), minlength=4)

    before = loads()
    for _ in range(60):
        c = ctx()
        moe(x, c)
        assert not c.aux  # no loss in this mode
        moe.after_step()
    after = loads()
    assert after.max() < before.max() and moe.bias[0] < 0
    assert "bias" in moe.state_dict() and "load" not in moe.state_dict()  # saved with the model


def test_flops_count_the_active_experts_only():
    def flops(**moe):
        torch.manual_seed(0)
        lm = LanguageModel(lm_cfg(**moe))
        with FlopCounterMode(display=False) as counter:
            lm(input_ids=torch.randint(0, 50, (2, 12)))
        return counter.get_total_flops()

    dense, four, eight, top2 = flops(), flops(experts=4, top_k=1), flops(experts=8, top_k=1), flops(experts=8, top_k=2)
    router = 2 * 2 * 12 * 16 * 4 * 2  # (2 layers) x 2 FLOPs x tokens x D x E, E = 4
    assert four - dense == router and eight - four == router  # the same active FFN work as dense
    ffn = 2 * 3 * 2 * 24 * 16 * 32  # 2 layers x (gate, up, down) x 2 FLOPs x 24 tokens x D x hidden
    assert top2 - eight == ffn  # a second expert per token: one more FFN's work


@pytest.mark.parametrize("setting,needle", [("lm.moe_experts=1", "a mixture needs at least 2 experts"),
                                            ("lm.moe_top_k=5", "lm.moe_top_k=5 must be between 1 and the 4"),
                                            ("lm.moe_routing=modal", "lm.moe_routing='modal' is not one of")])
def test_bad_moe_settings_are_one_line(setting, needle, tmp_path, capsys):
    args = ["train", "tiny", "--out", str(tmp_path / "run"), "--set", "lm.moe_experts=4", "--set", setting]
    assert main(args) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="is not a loss of model=vlm"):
        from graft.config_checks import apply_overrides, validate
        from graft.recipes import tiny

        validate(apply_overrides(tiny(), ["train.objectives={moe_balance: 0.01}"]))


def test_a_moe_run_logs_its_balance(tmp_path):
    """Through the CLI (balancing by loss, weighed by train.objectives): loss/moe_balance in every
    step's record, between 1 (balanced) and the expert count; the MoE layers are in the checkpoint.
    The bias mode runs through the CLI on 2 processes in test_parallel.py."""
    run = tmp_path / "run"
    sets = ["lm.moe_experts=4", "train.steps=6", "train.log_every=1", "train.progress=false", "eval.splits=",
            "train.objectives={lm: 1, moe_balance: 0.01}"]
    assert main(["train", "tiny", "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and all(1.0 <= r["loss/moe_balance"] <= 4.0 for r in steps)
    assert all(len(r["moe/load/0"]) == 4 and abs(sum(r["moe/load/0"]) - 1) < 1e-3 for r in steps)
    assert all(1.0 <= r["moe/max_load"] <= 4.0 for r in steps)
    from graft.rundir import RunDir
    from graft.trainer.checkpoint import read_model

    saved = read_model(RunDir(str(run)).latest_checkpoint())
    assert "lm.layers.0.mlp.router.weight" in saved and "lm.layers.0.mlp.experts.3.down_proj.weight" in saved
