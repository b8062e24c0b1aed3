"""How image tokens attend and where they sit in the built-in decoder (`lm.image_attention`,
`lm.image_positions`, `lm.image_cells`; models/image_layout.py), and the per-call layer context."""


import pytest
import torch

from graft.errors import UserError
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import LMConfig
from graft.models.image_layout import item_mask, item_numbers, mrope_positions
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM
from tests.helpers import cli, one_line_error

IMG = 5


def tiny_vlm(**lm) -> VLM:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=16, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64, **lm)
    return VLM(VisionConfig(image_size=16, patch_size=8, hidden_size=32, layers=1, heads=2, intermediate_size=64),
               ConnectorConfig(kind="linear"), cfg, image_token_id=IMG).eval()


def two_image_ids() -> torch.Tensor:
    # <bos> <user> [4 image tokens] text text [4 image tokens] text
    return torch.tensor([[1, 2] + [IMG] * 4 + [7, 8] + [IMG] * 4 + [9]])


def test_image_mask_joins_tokens_of_one_image_only():
    images = two_image_ids() == IMG
    m = item_mask(images, 4)[0]
    assert m[2:6, 2:6].all() and m[8:12, 8:12].all()
    assert not m[2:6, 8:12].any() and not m[8:12, 2:6].any()  # two images never see each other both ways
    assert not m[0].any() and not m[:, 6].any()  # text rows and columns are untouched


def test_adjacent_images_are_told_apart_by_their_token_count():
    ids = torch.tensor([[1, 2] + [IMG] * 8 + [9]])  # two 2x2 images with nothing between them
    m = item_mask(ids == IMG, 4)[0]
    assert m[2:6, 2:6].all() and m[6:10, 6:10].all() and not m[2:6, 6:10].any()
    t, row, col = mrope_positions(torch.arange(11)[None], ids == IMG, grid=2)[:, 0].tolist()
    assert t[2:10] == [2] * 4 + [6] * 4 and row[6:10] == [6, 6, 7, 7] and col[6:10] == [6, 7, 6, 7]


def test_items_of_different_token_counts_are_numbered_across_rows():
    """Per-item counts (a series of each length): items are read left to right, top to bottom,
    the same with counts as a tensor as with one int where they are all alike."""
    ids = torch.tensor([[1] + [IMG] * 3 + [7] + [IMG] * 2, [1, 7, 7] + [IMG] * 4])
    number, k = item_numbers(ids == IMG, torch.tensor([3, 2, 4]))
    assert number.tolist() == [[-1, 0, 0, 0, -1, 1, 1], [-1, -1, -1, 2, 2, 2, 2]]
    assert k.tolist() == [[-1, 0, 1, 2, -1, 0, 1], [-1, -1, -1, 0, 1, 2, 3]]
    m = item_mask(ids == IMG, torch.tensor([3, 2, 4]))
    assert m[0, 1:4, 1:4].all() and not m[0, 1:4, 5:].any() and m[1, 3:, 3:].all()
    same = torch.tensor([[1] + [IMG] * 4 + [IMG] * 4])
    for a, b in zip(item_numbers(same == IMG, 4), item_numbers(same == IMG, torch.tensor([4, 4]))):
        assert torch.equal(a, b)


def test_mrope_positions_put_image_tokens_on_their_grid():
    ids = two_image_ids()
    pos = mrope_positions(torch.arange(ids.shape[1])[None], ids == IMG, grid=2)[:, 0]
    t, row, col = pos.tolist()
    assert t[2:6] == [2, 2, 2, 2] and row[2:6] == [2, 2, 3, 3] and col[2:6] == [2, 3, 2, 3]
    assert t[8:12] == [8] * 4 and row[8:12] == [8, 8, 9, 9] and col[8:12] == [8, 9, 8, 9]
    for axis in (t, row, col):  # text keeps its 1-D positions on every axis
        assert [axis[i] for i in (0, 1, 6, 7, 12)] == [0, 1, 6, 7, 12]


SETTINGS = [("image_attention", "bidirectional"), ("image_positions", "mrope"), ("image_cells", True)]


@pytest.mark.parametrize("key,value", SETTINGS)
def test_each_image_setting_changes_the_logits_where_it_should(key, value):
    ids, pixels = two_image_ids(), torch.randn(2, 3, 16, 16)
    base, variant = tiny_vlm(), tiny_vlm(**{key: value})
    missing, unexpected = variant.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("cells.") for name in missing)
    with torch.no_grad():
        a, b = base(ids, pixels)[0], variant(ids, pixels)[0]
    assert torch.equal(a[0, :2], b[0, :2])  # text before the first image is untouched
    assert (a[0, 2:] - b[0, 2:]).abs().max() > 1e-4  # image tokens (and text after them) change


@pytest.mark.parametrize("key,value", SETTINGS)
def test_cached_generation_equals_recomputing_the_whole_sequence(key, value):
    """The prompt's image context is built once at prefill; decoding steps see it through the cache."""
    model, pixels = tiny_vlm(**{key: value}), torch.randn(2, 3, 16, 16)
    prompt = two_image_ids()
    new = model.generate(prompt, pixels, max_new_tokens=4, eos_id=15)[0]
    with torch.no_grad():
        prefix = model.embed(prompt, pixels)
    for i, token in enumerate(new):  # greedy, recomputed from scratch each step
        tail = torch.tensor([new[:i]], dtype=torch.long)
        with torch.no_grad():
            layout = model.layout(torch.cat([prompt == IMG, torch.zeros_like(tail, dtype=torch.bool)], 1), None, None, None)
            logits = model.lm(inputs_embeds=torch.cat([prefix, model.lm.embed_tokens(tail)], 1), layout=layout)
        assert int(logits[0, -1].argmax()) == token


def test_image_cells_add_a_row_and_a_column_vector_to_each_image_token():
    base, model = tiny_vlm(), tiny_vlm(image_cells=True)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("cells.")}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in own.items())  # a seed's other weights unchanged
    assert base.cells is None and set(model.state_dict()) - set(own) == {"cells.row.weight", "cells.col.weight"}
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain, celled = base.image_tokens(pixels), model.image_tokens(pixels)
    row, col = model.cells.row.weight, model.cells.col.weight
    for k in range(4):  # a 2 x 2 grid of tokens
        torch.testing.assert_close(celled[:, k], plain[:, k] + row[k // 2] + col[k % 2], atol=1e-6, rtol=0)


def test_packed_rows_keep_the_image_variants_per_document():
    """A packed row (two documents) gives each document the logits it gets alone, bidirectional too."""
    model = tiny_vlm(image_attention="bidirectional", image_positions="mrope", image_cells=True)
    doc = [1, 2] + [IMG] * 4 + [7, 8]
    ids = torch.tensor([doc + doc])
    pixels = torch.randn(2, 3, 16, 16)
    packed = {"position_ids": torch.tensor([list(range(8)) * 2]), "doc_ids": torch.tensor([[0] * 8 + [1] * 8])}
    with torch.no_grad():
        together = model(ids, pixels, **packed)[0]
        alone = [model(torch.tensor([doc]), pixels[i:i + 1])[0] for i in range(2)]
    torch.testing.assert_close(together[0, :8], alone[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[0, 8:], alone[1][0], atol=1e-5, rtol=0)


def test_layer_aux_losses_reach_the_model_losses():
    """A layer's auxiliary loss travels in the per-call context, not on the module, to the losses."""
    model = tiny_vlm()

    class Probe(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, ctx, cache=None):
            ctx.aux["probe"] = x.pow(2).sum()
            return self.inner(x, ctx, cache)

    model.lm.layers[1] = Probe(model.lm.layers[1])
    ids, labels = two_image_ids(), two_image_ids().clone()
    _, losses = model(ids, torch.randn(2, 3, 16, 16), labels=labels)
    assert set(losses) == {"lm", "probe"} and losses["probe"] > 0
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values()
                   if not isinstance(v, (torch.nn.Parameter, dict)))  # nothing left behind on a module


def test_bad_image_settings_are_one_line_errors():
    with pytest.raises(UserError, match="lm.image_attention='sideways'"):
        LMConfig.check(LMConfig(image_attention="sideways"))
    with pytest.raises(UserError, match="lm.image_positions=mrope needs the built-in decoder"):
        LMConfig.check(LMConfig(image_positions="mrope", hf_path="/some/folder"))
    with pytest.raises(UserError, match="mrope needs image tokens on a grid"):
        LMConfig.check(LMConfig(image_positions="mrope"), image_grid=False)
    with pytest.raises(UserError, match="lm.image_cells needs the built-in decoder"):
        LMConfig.check(LMConfig(image_cells=True, hf_path="/some/folder"))
    with pytest.raises(UserError, match="lm.image_cells needs image tokens on a grid"):
        LMConfig.check(LMConfig(image_cells=True), image_grid=False)
    with pytest.raises(UserError, match="vision.position_init_std=0.2 has no effect"):
        VisionConfig.check(VisionConfig(position_init_std=0.2, init_from="runs/x"))


@pytest.mark.parametrize("name,sets,needle", [
    ("shapes_resampler", ["lm.image_cells=true"], "lm.image_cells needs image tokens on a grid"),
    ("shapes_flamingo", ["lm.image_cells=true"], "lm.image_cells has no effect with model=flamingo"),
    ("sensors_vlm", ["lm.image_cells=true"], "lm.image_cells=True is not available with series data"),
    ("sensors_vlm", ["model=fuyu", "connector.kind=linear", "lm.image_cells=true"], "lm.image_cells is not available with series data"),
])
def test_cli_refuses_image_cells_where_image_tokens_have_no_grid(tmp_path, capsys, name, sets, needle):
    out = tmp_path / "run"
    one_line_error(cli(capsys, "train", name, "--out", out, *[a for s in sets for a in ("--set", s)]), needle)
    assert not out.exists()


def test_cli_refuses_mrope_with_a_resampler(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(cli(capsys, "train", "shapes_resampler", "--out", out, "--set", "lm.image_positions=mrope"),
                   "mrope needs image tokens on a grid")
    assert not out.exists()


def test_position_init_std_sets_the_tables_spread():
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        from graft.models.vit import ViT

        w = ViT(VisionConfig(image_size=64, patch_size=4, position_init_std=std)).embeddings.position_embedding.weight
        assert abs(float(w.detach().std()) - std) < 0.1 * std
