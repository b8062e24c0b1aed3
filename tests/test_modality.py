"""The image tokens' own LM parameters (`lm.modality_norms`, `lm.modality_ffn`): unchanged output at
initialisation, the image tokens and only they go through them, the `lm_image` part, and runs
trained without them initialising them from their text twins."""

import copy

import pytest
import torch

from graft.cli import main
from graft.errors import UserError
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import LMConfig
from graft.models.modality import image_twins
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM
from tests.helpers import tiny_vlm, tokenizer


def with_modality(model: VLM, norms: bool = True, ffn: bool = True) -> VLM:
    """`model` with image modules added, its own weights kept, the new ones copied from the text ones."""
    tok = tokenizer()
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate_size=64)
    lm = LMConfig(vocab_size=len(tok), hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64,
                  modality_norms=norms, modality_ffn=ffn)
    twin = VLM(vision, ConnectorConfig("mlp"), lm, tok.image)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing and all("_image." in k for k in missing)
    twin.lm.copy_to_image_modules()
    return twin


def inputs(proc):
    convs = [proc.conversation([("what color is the circle?", "red")]) for _ in range(2)]
    return torch.tensor([c[0] for c in convs]), torch.randn(2, 3, 32, 32)


def test_at_initialisation_the_image_modules_change_nothing():
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    twin = with_modality(model)
    names = [n for n, _ in twin.named_parameters() if "_image." in n]
    assert any("mlp_image." in n for n in names) and any("layernorm_image." in n for n in names)
    ids, pix = inputs(proc)
    torch.testing.assert_close(twin(ids, pix)[0], model(ids, pix)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", ["mlp_image.down_proj", "input_layernorm_image", "post_attention_layernorm_image"])
def test_only_the_image_tokens_go_through_the_image_modules(module):
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    twin = with_modality(model)
    ids, pix = inputs(proc)
    first = int((ids[0] == proc.tok.image).nonzero()[0])
    image = ids == proc.tok.image
    with torch.no_grad():
        before = twin(ids, pix)[0]
        twin.lm.layers[1].get_submodule(module).weight.mul_(3.0)
        after = twin(ids, pix)[0]
    assert torch.equal(after[:, :first], before[:, :first])  # text before the image: untouched
    assert not torch.allclose(after[image], before[image], atol=1e-4)


def test_freezing_the_lm_trains_only_its_image_modules_and_the_connector():
    model, _ = tiny_vlm()
    twin = with_modality(model, ffn=False)
    twin.freeze(["vision", "lm"])
    trainable = {n for n, p in twin.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") or "layernorm_image." in n for n in trainable)
    assert any("layernorm_image." in n for n in trainable)
    twin.freeze(["lm_image"])
    assert all(n.startswith("connector.") for n, p in twin.named_parameters() if p.requires_grad)
    with pytest.raises(UserError, match="train.freeze: lm_image: this model has none"):
        model.freeze(["lm_image"])


def test_a_run_without_image_modules_initialises_them_from_its_text_modules(tmp_path):
    from graft.build import assemble, load_run
    from graft.rundir import RunDir

    quiet = ["--set", "train.progress=false", "--set", "eval.splits="]
    assert main(["train", "tiny", "--out", str(tmp_path / "text"), "--set", "train.steps=3", *quiet]) == 0
    cfg, tok, source, _ = load_run(RunDir(str(tmp_path / "text")))
    cfg = copy.deepcopy(cfg)
    cfg.lm.modality_norms = cfg.lm.modality_ffn = True
    cfg.train.init_from = str(tmp_path / "text")
    model = assemble(cfg, tok)
    params, loaded = dict(model.named_parameters()), dict(source.named_parameters())
    twins = image_twins(model)
    assert len(twins) == 5 * cfg.lm.layers  # per layer two norms and an FFN of three linears
    for name, twin in twins.items():
        assert torch.equal(params[name], loaded[twin]), name
    # and the CLI trains such a run, then refuses to export it as LLaVA (which has no such modules)
    run = tmp_path / "modality"
    assert main(["train", "tiny", "--out", str(run), "--set", "lm.modality_norms=true", "--set", "lm.modality_ffn=true",
                 "--set", "train.steps=2", "--set", f"train.init_from={tmp_path / 'text'}", *quiet]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2


def test_init_parts_lm_from_a_run_without_image_modules_fills_them(tmp_path):
    """`train.init_parts: {lm: RUN}` into an LM with image modules: the text modules come from the
    run and the image ones start as copies of them."""
    from graft.trainer.checkpoint import read_model

    quiet = ["--set", "train.progress=false", "--set", "eval.splits="]
    assert main(["train", "tiny", "--out", str(tmp_path / "text"), "--set", "train.steps=3", *quiet]) == 0
    run = tmp_path / "norms"
    assert main(["train", "tiny", "--out", str(run), "--set", "lm.modality_norms=true", "--set", "train.steps=1",
                 "--set", f"train.init_parts={{lm: {tmp_path / 'text'}}}", "--set", "train.freeze=[vision, lm, lm_image]",
                 *quiet]) == 0
    src = read_model(sorted((tmp_path / "text" / "checkpoints").iterdir())[-1])
    got = read_model(sorted((run / "checkpoints").iterdir())[-1])
    norm = "lm.layers.0.input_layernorm.weight"
    assert torch.equal(got[norm], src[norm]) and torch.equal(got[norm.replace("norm.", "norm_image.")], src[norm])
