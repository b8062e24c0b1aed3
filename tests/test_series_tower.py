"""The series tower's variants: channel-independent patches (PatchTST) keep each channel's tokens to
that channel, and read recordings of any length like the channel-mixing tower."""

import torch

from tests.test_series import built, small


def test_channel_independent_patches_keep_each_channel_to_its_own_tokens():
    cfg, model, _ = built(small("series.channel_independent=true"))
    tower = model.vision.eval()
    assert model.num_image_tokens == cfg.series.num_patches == 1 + 16 * 6
    torch.manual_seed(0)
    x = torch.randn(1, 6, 256)
    y = x.clone()
    y[0, 2, 40:60] += 3.0  # channel 2, in its patches 2 and 3
    with torch.no_grad():
        changed = (tower.features(x) - tower.features(y)).abs().amax(-1)[0] > 0  # (97,)
    by_channel = changed[1:].view(16, 6)  # token 1 + p·6 + c: patch p of channel c
    assert changed[0] and by_channel[:, 2].all()  # the statistics, and channel 2 everywhere (its scale moved)
    assert not by_channel[:, [0, 1, 3, 4, 5]].any()  # the other channels' tokens are bit for bit the same
    _, mixing, _ = built(small())
    with torch.no_grad():
        assert ((mixing.vision.features(x) - mixing.vision.features(y)).abs().amax(-1) > 0).all()  # every token moves


def test_channel_independent_tokens_of_a_shorter_recording_are_a_prefix():
    cfg, model, _ = built(small("series.channel_independent=true"))
    tower = model.vision.eval()
    short = torch.randn(1, 6, 100)  # 6 patches of 16 steps: 1 + 36 tokens, the last 4 steps unread
    padded = torch.cat([short, torch.zeros(1, 6, 156)], -1)
    assert cfg.series.tokens(100) == 37 and cfg.series.steps(37) == 96
    with torch.no_grad():
        alone = tower.features(short[..., :96])
        beside = tower.features(torch.cat([padded, torch.randn(1, 6, 256)]), counts=torch.tensor([37, 97]))
    torch.testing.assert_close(beside[0, :37], alone[0], atol=1e-5, rtol=0)  # fp32 sums in another order
