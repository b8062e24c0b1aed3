"""The design registry (graft/designs/): the one place that decides by design, what each entry
promises, and `--set` on a model section the design does not read."""

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from graft.cli import main
from graft.designs import DESIGNS, GENERATES, MODEL_SECTIONS
from graft.recipes import RECIPES
from graft.build import build_model, build_processor

PACKAGE = Path(__file__).resolve().parent.parent / "graft"
# Decisions by design name or model type belong in graft/designs/ (and the evaluation registry
# keys its scorers by capability); anywhere else they are a missing seam.
FORBIDDEN = [r"cfg\.model\s*[!=]=", r"\.model\s*==\s*\"(vlm|dual)\"", r"isinstance\([^)]*DualEncoder",
             r"isinstance\([^)]*\bVLM\b", r"global_batch_loss = True", r"getattr\(\w+, \"global_batch_loss\"",
             r"\"input_ids\" in batch"]


def test_no_design_decision_outside_the_registry():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "designs" in path.relative_to(PACKAGE).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in FORBIDDEN):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def named_decisions(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, code) of every comparison of something with one of `names` as a string constant,
    alone or in a tuple, list or set (`x == "fuyu"`, `kind not in ("linear", "mlp")`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            constants = [e for side in sides for e in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set))
                                                      else [side])]
            if any(isinstance(e, ast.Constant) and e.value in names for e in constants):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_design_connector_or_source_is_decided_by_its_name():
    """Parsed, not grepped: nowhere in graft is a value compared with a design's name, a connector
    kind or a data source's name; what differs between them is asked of the registry entry
    (capabilities, `per_patch`, `activation_width`; a source's `indexed`, `options`, ...). The
    search finds such a comparison where there is one."""
    from graft.data.sources import SOURCES
    from graft.models.connectors import CONNECTORS

    names = set(DESIGNS) | set(CONNECTORS) | set(SOURCES)
    assert named_decisions(ast.parse('ok = kind not in ("linear", "mlp") or model == "fuyu"'), names) == [
        (1, "kind not in ('linear', 'mlp')"), (1, "model == 'fuyu'")]
    offenders = [f"{path.relative_to(PACKAGE)}:{line}: {code}" for path in sorted(PACKAGE.rglob("*.py"))
                 for line, code in named_decisions(ast.parse(path.read_text()), names)]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("recipe", ["tiny", "tiny_modality", "shapes_flamingo", "shapes_fuyu", "clip", "clippo"])
def test_each_design_builds_what_its_entry_promises(recipe):
    from graft.data.world_source import make_world
    from graft.data.tokenizer import ChatTokenizer, world_corpus

    cfg = RECIPES[recipe.removesuffix("_modality")]()
    cfg.lm.modality_norms = cfg.lm.modality_ffn = recipe.endswith("_modality")
    entry = DESIGNS[cfg.model]
    tok = ChatTokenizer.train(world_corpus(make_world(cfg)), cfg.data.vocab_size)
    model = build_model(cfg, tok)

    def trainable() -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    for part in entry.parts:  # what train.freeze may name freezes something (CLIPPO has no text tower,
        # a VLM without lm.modality_* no lm_image modules)
        if (cfg.contrastive.shared_tower and part == "text") or (part == "lm_image" and not model.part_modules(part)):
            continue
        before = trainable()
        model.freeze([part])
        assert trainable() < before, part
    assert set(entry.sections) <= set(MODEL_SECTIONS)
    proc = build_processor(cfg, tok, model)
    if entry.can(GENERATES):  # placeholders per image: what the model will scatter its features into
        assert proc.num_image_tokens == model.num_image_tokens
        assert proc.prompt("what color is it?").count(tok.image) == model.num_image_tokens
    else:
        assert hasattr(model, "encode_image") and hasattr(model, "encode_text")


@pytest.mark.parametrize("recipe, key", [("clip", "connector.kind=linear"), ("clip", "lm.layers=2"),
                                         ("tiny", "text.layers=2"), ("tiny", "contrastive.loss=clip")])
def test_a_section_the_design_does_not_read_is_refused(recipe, key, tmp_path, capsys):
    assert main(["train", recipe, "--out", str(tmp_path / "run"), "--set", key]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--set {key.split('=')[0]}" in err and "does not read" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_design_is_one_line():
    from graft.config_checks import apply_overrides
    from graft.errors import UserError
    from graft.recipes import tiny

    with pytest.raises(UserError, match="model='nope' is not one of vlm, flamingo, fuyu, dual"):
        apply_overrides(tiny(), ["model=nope"])


@pytest.mark.parametrize("recipe,setting,needle", [
    ("shapes_vqa", "model=eve", "model='eve' is not one of vlm, flamingo, fuyu, dual, qformer_stage1"),
    ("shapes_fuyu", "connector.kind=resampler", "model=fuyu projects each raw patch"),
    ("shapes_fuyu", "lm.image_positions=mrope", "lm.image_positions needs each image as one run of tokens"),
    ("shapes_flamingo", "flamingo.attend=next", "flamingo.attend='next' is not one of previous, all"),
    ("shapes_flamingo", "flamingo.every=4", "flamingo.every=4 exceeds lm.layers=3"),
    ("shapes_flamingo", "lm.image_attention=bidirectional", "lm.image_attention has no effect with model=flamingo"),
    ("clip", "data.pack=true", "data.pack=true needs data.source=shapes, model=vlm, flamingo, fuyu and"),
    ("shapes_pixel_shuffle", "connector.scale_factor=3", "connector.scale_factor=3"),  # 4x4 patches: 3 does not divide
    ("shapes_resampler", "connector.latents=100", "connector.latents=100 is more than 4 x the 9 patches"),
    ("shapes_qformer", "connector.qformer.queries=0", "connector.qformer.queries=0"),
    ("shapes_vqa", "lm.image_attention=sideways", "lm.image_attention='sideways' is not one of causal, bidirectional"),
])
def test_bad_design_settings_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, recipe, setting, needle):
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


TINY_LM = ["lm.hidden_size=32", "lm.layers=2", "lm.heads=4", "lm.kv_heads=2", "lm.intermediate_size=64"]
RESUMED = {  # every design and LM variant with state of its own (gates, experts' biases, image modules, documents)
    "flamingo": ("tiny", ["model=flamingo", "flamingo.gate=none"]),
    "fuyu": ("shapes_fuyu", [*TINY_LM, "train.batch_size=16"]),
    "moe_bias": ("tiny", ["lm.moe_experts=4", "lm.moe_balance=bias", "lm.moe_bias_rate=0.05"]),
    "modality_modules": ("tiny", ["lm.modality_norms=true", "lm.modality_ffn=true"]),
    "flamingo_documents": ("tiny", ["model=flamingo", "flamingo.attend=all", "data.images_per_doc=3",
                                    "data.questions_per_image=1"]),
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_every_design_resumes_exactly_and_evaluates(tmp_path, case):
    """A run resumed from its step-3 checkpoint logs the uninterrupted run's losses bit for bit, then
    evaluates through the same command."""
    recipe, sets = RESUMED[case]
    sets = [*sets, "train.steps=6", "train.ckpt_every=3", "train.log_every=1", "train.progress=false",
            "eval.vqa_per_type=2", "eval.captions=2", "eval.splits=[test]"]
    args = [a for s in sets for a in ("--set", s)]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", recipe, "--out", str(whole), *args]) == 0
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "eval.json").unlink()
    assert main(["train", recipe, "--out", str(resumed), *args]) == 0

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r.get("moe/load/0")) for r in records if "loss" in r]

    assert len(losses(whole)) == 6 and losses(resumed) == losses(whole)
    assert "vqa_acc" in json.loads((resumed / "eval.json").read_text())


def bare_modality_ids(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, code) of every comparison of something named `*modality_ids*` with a bare number."""
    return [(node.lineno, ast.unparse(node)) for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and "modality_ids" in ast.unparse(node.left)
            and any(isinstance(c, ast.Constant) and isinstance(c.value, int) for c in node.comparators)]


def test_modality_ids_are_named():
    """Tokens' modalities are compared with the names of graft/models/modality.py, never a number."""
    assert bare_modality_ids(ast.parse("a = ctx.modality_ids == 1\nb = modality_ids == IMAGE")) == [
        (1, "ctx.modality_ids == 1")]
    offenders = [f"{path.relative_to(PACKAGE)}:{line}: {code}" for path in sorted(PACKAGE.rglob("*.py"))
                 for line, code in bare_modality_ids(ast.parse(path.read_text()))]
    assert not offenders, "\n".join(offenders)


ADDED_DESIGN = '''
import dataclasses, sys
from graft import config
from graft.config_checks import apply_overrides, load
from graft.designs import DESIGNS
from graft.designs.registry import register
from graft.errors import UserError
from graft.recipes import tiny

@dataclasses.dataclass
class EchoConfig:
    depth: int = 1

register("echo", dataclasses.replace(DESIGNS["vlm"], sections=("vision", "connector", "lm", "echo"),
                                     config_sections={"echo": EchoConfig}))
cfg = apply_overrides(tiny(), ["model=echo", "echo.depth=3"])
config.save(cfg, __import__("pathlib").Path(sys.argv[1]))
again = load(__import__("pathlib").Path(sys.argv[1]))
print(again.echo.depth, again == cfg)
try:
    apply_overrides(tiny(), ["echo.depth=2"])
except UserError as e:
    print(e)
register("stills", dataclasses.replace(DESIGNS["vlm"], modalities=frozenset({"image"})))
try:
    apply_overrides(tiny(), ["model=stills", "data.source=sensors", "eval.splits=[test]", "vision.image_size=32",
                             "data.grid=4"])
except UserError as e:
    print(e)
'''


def test_a_design_brings_its_config_section_without_touching_config_py(tmp_path):
    """A design registered from outside graft (as docs/architecture.md's steps say) brings its own
    config section: set, saved, loaded and refused for another design, with config.py untouched."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ADDED_DESIGN, str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "3 True", "--set echo.depth: model=vlm does not read the 'echo' section (it reads vision, connector, lm, series, distill)",
        "data.source=sensors gives series items; model=stills reads image items"]
    assert "echo:\n  depth: 3" in (tmp_path / "config.yaml").read_text()
