"""The series tower's variants: channel-independent patches (PatchTST) keep each channel's tokens to
that channel and read recordings of any length like the channel-mixing tower; a 1-D wide ResNet
(WRN16-3, WRN28-1) gives the patch tower's token count; each refuses the other's settings."""

import re

import numpy as np
import pytest
import torch

from graft.config_checks import apply_overrides
from graft.data.samples import BadSample
from graft.errors import UserError
from graft.models.series import SeriesConfig
from graft.recipes import sensors_vlm
from tests.test_series_designs import small_run
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


def test_a_wide_resnet_tower_gives_the_patch_towers_token_count():
    cfg, model, proc = built(small("series.tower=wrn", "series.hidden_size=64", "series.layers=2"))
    tower = model.vision
    assert (cfg.series.wrn_depth, cfg.series.wrn_width, tower.embed_dim) == (16, 3, 192)  # WRN16-3: 64 x 3
    x = torch.randn(2, 6, 256)
    assert tower.features(x).shape == (2, 17, 192) == (2, model.num_image_tokens, tower.embed_dim)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in tower.modules()) == 2 * 6 + 1  # 6 blocks of WRN16
    with pytest.raises(BadSample, match="100 steps, not series.length=256 .series.tower=wrn reads recordings of one length"):
        proc.pixels(np.zeros((6, 100), np.float32))
    _, thin, _ = built(small("series.tower=wrn", "series.hidden_size=64", "series.layers=2", "series.wrn_depth=28",
                             "series.wrn_width=1"))
    assert thin.vision.embed_dim == 64 and len(thin.vision.blocks) == 12  # WRN28-1: 4 blocks per group


@pytest.mark.parametrize("overrides,needle", [
    (["series.tower=wrn", "series.layers=3"], "series.layers is read by series.tower=patch, not wrn"),
    (["series.wrn_depth=28"], "series.wrn_depth is read by series.tower=wrn, not patch"),
    (["series.tower=wrn", "series.wrn_depth=15"], "series.wrn_depth=15 must be 6n + 4"),
    (["series.tower=cnn"], "series.tower='cnn' is not one of patch, wrn"),
])
def test_series_tower_settings_that_cannot_act_are_refused(overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        SeriesConfig.check(apply_overrides(sensors_vlm(), overrides).series)


@pytest.mark.slow
def test_a_vlm_with_a_wide_resnet_tower_learns_the_sensor_world(capsys, tmp_path):
    """WRN10-1 as the tower (small LM), scored on people never seen (activity chance 1/7, the commonest
    0.22; a "no" to every "changed?" gives 0.53). Measured on AMD EPYC, one thread, seeds 0/1/2:
    activity 0.77/0.77/0.98, changed 0.97/0.97/0.98, moving 1.00 each."""
    metrics = small_run(capsys, tmp_path, "series.tower=wrn", "series.wrn_width=1", "series.wrn_depth=10")
    assert metrics["vqa_acc/activity"] >= 0.45 and metrics["vqa_acc/changed"] >= 0.85, metrics
