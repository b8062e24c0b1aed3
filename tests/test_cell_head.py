"""The cell head (`data.cell_targets`, models/cell_head.py, data/cells.py): each training image's
placeholders carry their cell's true shape, colour and size, padded and packed alike; the loss is
counted, reaches the connector and is logged; generation and the default batch are untouched; the
export leaves the head out; settings it cannot serve are refused in one line."""

import pytest
import torch

from graft.build import processor_for
from graft.data.cells import cell_classes, classes
from graft.data.packing import pack
from graft.data.shapes import COLORS, SHAPES, SIZES
from graft.data.streaming import read_record
from graft.data.world_source import WorldSource
from graft.designs import design
from graft.losses import IGNORE
from graft.recipes import recipe
from tests.helpers import assert_refused, cli, with_and_without

ON = ["data.cell_targets=true", "train.objectives={lm: 1.0, compare: 0.1, cells: 1.0}"]
OFF = ["data.cell_targets=false", "train.objectives={lm: 1.0, compare: 0.1}"]


def test_classes_name_each_cells_object_row_by_row():
    world = WorldSource(recipe("shapes_spatial", ON), None).world
    for i in range(50):
        sample = world.sample("train", i)
        cells = cell_classes(sample, 3)
        assert sum(c[:3] != (0, 0, 0) for c in cells) == len(sample.objects)
        assert [c[3:] for c in cells] == [(row, col) for row in range(3) for col in range(3)]
        for o in sample.objects:
            shape, color, size, _, _ = cells[3 * o.row + o.col]
            assert (SHAPES[shape - 1], list(COLORS)[color - 1], SIZES[size - 1]) == (o.shape, o.color, o.size)


def rows(cfg, n=8, split="train"):
    proc = processor_for(cfg)
    source = WorldSource(cfg, proc, split)
    return proc, source, [read_record(proc, cfg.data, source, i)[0] for i in range(n)]


def test_targets_sit_at_every_placeholder_of_training_images_padded_and_packed():
    cfg = recipe("shapes_spatial", ON)
    proc, source, items = rows(cfg)
    padded = proc.collate(items)
    at = padded["cell_labels"][..., 0] != IGNORE
    assert torch.equal(at, padded["input_ids"] == proc.placeholder)  # every placeholder, nothing else
    want = [c for i in range(len(items)) for c in cell_classes(source.world.sample("train", i), 3)]
    assert padded["cell_labels"][at].tolist() == [list(c) for c in want]  # rows read in order: image by image
    packed = pack(items, proc.tok.pad, proc.max_seq_len, inputs=proc.inputs)
    pat = packed["cell_labels"][..., 0] != IGNORE
    assert torch.equal(pat, packed["input_ids"] == proc.placeholder)
    assert sorted(map(tuple, packed["cell_labels"][pat].tolist())) == sorted(want)
    assert torch.equal(packed["compare_labels"][packed["compare_labels"][..., 0] != IGNORE].sort(0).values,
                       padded["compare_labels"][padded["compare_labels"][..., 0] != IGNORE].sort(0).values)


def test_off_and_evaluation_conversations_carry_no_targets():
    on, off = recipe("shapes_spatial", ON), recipe("shapes_spatial", OFF)
    _, _, plain = rows(off)
    _, _, marked = rows(on)
    assert all(len(r) <= 4 for r in plain) and "cell_labels" not in processor_for(off).collate(plain)
    assert [r[:2] for r in plain] == [r[:2] for r in marked]  # the same conversations
    assert all(WorldSource(on, None, "val").example(i).cells is None for i in range(5))


def test_the_loss_is_counted_reaches_the_connector_and_generation_ignores_the_head():
    cfg = recipe("shapes_spatial", ON)
    proc, _, items = rows(cfg)
    batch = proc.collate(items)
    model, plain = with_and_without(cfg, recipe("shapes_spatial", OFF), proc.tok)
    assert model.cell_head is not None and plain.cell_head is None
    assert "cells" in design(cfg.model).config_losses(cfg)
    _, losses = model(**batch, answers_only=True)
    counts = model.loss_counts(**batch)
    assert counts["cells"] == int((batch["input_ids"] == proc.placeholder).sum()) > 0
    chance = sum(torch.log(torch.tensor(float(n))) for n in classes(3)).item() / len(classes(3))
    assert 0.5 * chance < losses["cells"].item() / counts["cells"] < 2 * chance
    losses["cells"].backward()
    assert model.cell_head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
    assert model.lm.layers[0].self_attn.q_proj.weight.grad is None  # it reads the LM's input, not its layers
    with torch.no_grad():
        ids = batch["input_ids"][:1, :20]
        assert torch.equal(model(ids, batch["pixel_values"][:1])[0], plain(ids, batch["pixel_values"][:1])[0])


@pytest.mark.parametrize("name,sets,needle", [
    ("clip", ["data.cell_targets=true"], "needs data.source=shapes, a VLM model"),
    ("sensors_vlm", ["data.cell_targets=true"], "needs data.source=shapes"),
    ("shapes_vqa", ["data.cell_targets=true", "data.images_per_doc=2"], "one image per conversation"),
    ("shapes_vqa", ["data.cell_targets=true", "data.text_only=true"], "one image per conversation"),
    ("shapes_flamingo", ["data.cell_targets=true"], "not available with model=flamingo"),
    ("shapes_vqa", ["data.cell_targets=true", "vision.image_size=32"], "one image token per cell of the 3x3 grid (9); this model gives 16"),
    ("shapes_resampler", ["data.cell_targets=true"], "one image token per cell"),
    ("shapes_vqa", ["train.objectives={lm: 1.0, cells: 1.0}"], "cells"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, name, sets, needle):
    assert_refused(tmp_path, capsys, [(name, sets, needle)])


def test_a_training_run_logs_the_loss_and_learns_differently(tmp_path, capsys):
    from safetensors.torch import load_file

    from graft.trainer.metrics import read

    small = ["train.steps=3", "train.batch_size=4", "train.log_every=1", "eval.splits=[]", "train.progress=false"]
    weights = {}
    for flag, sets in (("on", ON), ("off", OFF)):
        run = tmp_path / flag
        code, _, err = cli(capsys, "train", "shapes_spatial", "--out", run, *(a for s in small + sets for a in ("--set", s)))
        assert code == 0, err
        assert ("loss/cells" in [r for r in read(run) if "loss" in r][-1]) == (flag == "on")
        (model,) = (run / "checkpoints").glob("step_*/model/*.safetensors")
        weights[flag] = load_file(model)
    assert any(k.startswith("cell_head.") for k in weights["on"])
    name = next(k for k in weights["off"] if k.startswith("connector."))
    assert not torch.equal(weights["on"][name], weights["off"][name])


def test_export_leaves_the_head_out(tmp_path, capsys):
    """`graft export --format hf` of a ViT VLM whose 3x3 patches are the world's cells."""
    run = tmp_path / "run"
    sets = ["data.cell_targets=true", "train.objectives={lm: 1.0, cells: 1.0}", "train.steps=1",
            "eval.splits=[]", "train.progress=false"]
    assert cli(capsys, "train", "tiny", "--out", run, *(a for s in sets for a in ("--set", s)))[0] == 0
    code, _, err = cli(capsys, "export", run, "--out", tmp_path / "hf")
    assert code == 0, err
    from safetensors.torch import load_file
    exported = {k for f in (tmp_path / "hf").glob("*.safetensors") for k in load_file(f)}
    assert exported and not any("cell_head" in k for k in exported)
