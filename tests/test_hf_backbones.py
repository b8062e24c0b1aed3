"""Hugging Face backbones in (`lm.hf_path`, `vision.hf_path`), LoRA through peft, and the two-stage
LLaVA recipe on them, with tiny random Llama / Qwen2 / GPT-2 LMs and SigLIP / CLIP towers that
the tests build and save themselves."""

import pytest
import torch
from hf_models import CLIP_MEAN, make_lm, make_vision
from graft.trainer.checkpoint import read_model

from graft.cli import main
from graft.data.hf_tokenizer import HFChatTokenizer, TemplateProcessor
from graft.data.world_source import make_world
from tests.helpers import world_batches
from graft.losses import IGNORE, batch_loss
from graft.models.lora import add_lora, merge_lora
from graft.recipes import tiny
from graft.build import build_model, build_processor, load_run, resolve_backbones
from graft.rundir import RunDir
from graft.trainer.metrics import read

TURNS = [("what color is the circle?", "red"), ("how many shapes are there?", "2")]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    paths = {k: make_lm(k, root / k) for k in ("llama", "qwen2", "gpt2")}
    paths |= {k: make_vision(k, root / k) for k in ("siglip", "clip")}
    return paths


def cli(*args):
    """`graft ARGS` in this process (test_e2e.py runs the real process once)."""
    assert main([*args]) == 0, args


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


QUICK = ("train.progress=false", "train.batch_size=8", "eval.vqa_per_type=2", "eval.captions=2",
         "eval.splits=[test]", "optim.warmup_steps=2")


@pytest.mark.parametrize("lm", ["llama", "qwen2", "gpt2"])
def test_chat_template_labels_only_the_answers(hf, lm):
    tok = HFChatTokenizer.load(hf[lm])
    proc = TemplateProcessor(tok, 24, 9, 256)
    ids, labels = proc.conversation(TURNS)
    assert ids.count(tok.image) == 9 and len(ids) == len(labels)
    supervised = tok.tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    # Exactly the answers, each followed by the template's end of turn (which holds eos).
    assert supervised.replace(tok.tok.eos_token, "|").replace("\n", "") == "red|2|"
    assert ids[: len(proc.prompt(TURNS[0][0]))] == proc.prompt(TURNS[0][0])  # inference prompt = training prefix
    short = TemplateProcessor(tok, 24, 9, len(ids) - 1).conversation(TURNS)[0]
    assert short == ids[: len(short)] and short.count(tok.image) == 9  # the second turn is dropped whole


def assert_backbones_are_the_folders(model, lm_folder, vision_folder) -> None:
    """`model`'s LM and vision tower compute what transformers' own classes loaded from the folders
    compute: the logits of every token the folder's vocabulary has (graft appends <image> after it),
    and the last encoder layer's patch states (graft's feature_layer=-1; CLIP's class token dropped)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    ids, pixels = torch.randint(0, 320, (2, 11)), torch.randn(2, 3, 24, 24)
    lm_ref = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    tower_ref = AutoModel.from_pretrained(vision_folder).eval()
    with torch.no_grad():
        logits = model.lm(input_ids=ids)
        want = tower_ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        want = want[:, 1:] if tower_ref.config.model_type.startswith("clip") else want
        got = model.vision.features(pixels)
        # O(1) values from the same kernels in the same order: equal up to fp32 rounding (~1e-7);
        # 1e-5 is loose for that and far below what other weights give (random init: ~1e-1).
        torch.testing.assert_close(logits[..., :320], lm_ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lm,vision", [("llama", "siglip"), ("qwen2", "clip"), ("gpt2", "siglip")])
def test_train_hf_backbones_through_the_cli(hf, tmp_path, lm, vision):
    """The run's model is built from the folders' weights (compared with transformers' classes
    loaded from them), trains (the loss falls, the backbones' weights move), and its checkpoint
    holds those backbones under their HF names (`lm.model.`/`vision.model.` + HF's key)."""
    from transformers import AutoModelForCausalLM

    from graft.build import assemble, resolve, tokenizer_for

    run = tmp_path / "run"
    cli("train", "tiny", "--out", str(run), *sets(*QUICK, f"lm.hf_path={hf[lm]}", f"vision.hf_path={hf[vision]}",
                                                    "train.steps=8", "train.log_every=4", "optim.lr=1e-2"))
    cfg = RunDir(run).config()  # the folders' architecture is what config.yaml records
    assert (cfg.lm.hidden_size, cfg.lm.layers, cfg.vision.hidden_size, cfg.vision.image_size) == (32, 2, 32, 24)
    assert cfg.lm.vocab_size == 321  # 320 tokens + the <image> graft added
    if vision == "clip":
        assert cfg.vision.image_mean == pytest.approx(CLIP_MEAN)  # from its preprocessor_config.json
    assert (run / "hf_tokenizer" / "tokenizer.json").is_file()
    assert (run / "eval.json").is_file()  # evaluation generated through the HF LM's KV cache
    # Step 0 of this run: the one assembly path the CLI uses, on the run's resolved config.
    tok = tokenizer_for(cfg)
    fresh = assemble(resolve(cfg, tok)[0], tok).eval()
    assert_backbones_are_the_folders(fresh, hf[lm], hf[vision])
    losses = [r["loss"] for r in read(run) if "loss" in r]
    assert losses[-1] < losses[0], losses
    trained = read_model(RunDir(run).latest_checkpoint())
    lm_ref = AutoModelForCausalLM.from_pretrained(hf[lm])
    lm_ref.resize_token_embeddings(321, mean_resizing=False)
    missing, unexpected = lm_ref.load_state_dict(
        {k.removeprefix("lm.model."): v for k, v in trained.items() if k.startswith("lm.model.")}, strict=False)
    # Every HF key is there, nothing else under lm., except a tied head (Qwen2 here), which safetensors
    # stores once, as the input embedding.
    tied = lm_ref.config.tie_word_embeddings
    assert not unexpected and missing == (["lm_head.weight"] if tied else []), (missing, unexpected)
    moved = [k for k, v in lm_ref.state_dict().items() if not torch.equal(v, fresh.lm.model.state_dict()[k])]
    assert len(moved) > len(lm_ref.state_dict()) // 2, moved  # the backbone trained (not frozen)
    if lm == "llama":  # the same command with more steps resumes (the resolved config matches)
        cli("train", "tiny", "--out", str(run), *sets(*QUICK, f"lm.hf_path={hf[lm]}", f"vision.hf_path={hf[vision]}",
                                                        "train.steps=12", "train.log_every=4", "optim.lr=1e-2"))
        assert [r["step"] for r in read(run) if "loss" in r][-1] == 12


def test_lora_trains_only_adapters_and_connector(hf):
    cfg = tiny()
    cfg.lm.hf_path, cfg.vision.hf_path, cfg.lm.lora_rank = str(hf["llama"]), str(hf["siglip"]), 4
    cfg.train.batch_size = 8
    tok = HFChatTokenizer.load(hf["llama"])
    resolve_backbones(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    add_lora(model.lm, cfg.lm)
    model.freeze(["vision"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("connector.") for n in trainable), trainable
    assert sum(".lora_A." in n for n in trainable) == 14  # q,k,v,o,gate,up,down x 2 layers
    assert {n for n in trainable if n.startswith("connector.")} == {f"connector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    batch = world_batches(cfg, build_processor(cfg, tok, model)).batch(0, 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = batch_loss(model, batch)
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    # Merging folds B·A into the base weights: same function, the names of a model without LoRA.
    model.eval()
    with torch.no_grad():
        before = model(batch["input_ids"], batch["pixel_values"])[0]
        assert merge_lora(model.lm) == 14
        after = model(batch["input_ids"], batch["pixel_values"])[0]
    assert (before - after).abs().max() <= 1e-5
    assert not [n for n in model.state_dict() if "lora_" in n or "base_layer" in n]


def test_two_stage_llava_recipe_with_lora_and_export(hf, tmp_path):
    """Stage 1 trains the connector only; stage 2 (LoRA) starts from it; the result exports to HF."""
    from test_hf_export import load_hf

    from graft.export import export

    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "hf"
    backbones = (f"lm.hf_path={hf['qwen2']}", f"vision.hf_path={hf['siglip']}", "train.steps=6")
    cli("train", "llava_stage1", "--out", str(s1), *sets(*QUICK, *backbones))
    cli("train", "llava_stage2_lora", "--out", str(s2), *sets(*QUICK, *backbones, f"train.init_from={s1}"))
    w1 = read_model(RunDir(s1).latest_checkpoint())
    w2 = read_model(RunDir(s2).latest_checkpoint())
    lm_base = [k for k in w1 if k.startswith("lm.")]
    for k in lm_base:  # stage 2's frozen base weights are stage 1's (LoRA-wrapped layers renamed)
        module, _, leaf = k.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        assert torch.equal(w1[k], w2[wrapped if wrapped in w2 else k]), k
    assert any(".lora_B." in k and w2[k].abs().max() > 0 for k in w2)  # the adapters trained
    assert not torch.equal(w1["connector.linear_1.weight"], w2["connector.linear_1.weight"])

    export(s2, out)
    model_hf, processor, info, warnings = load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not [w for w in warnings if "weight" in w.lower()], warnings
    cfg, tok, model, _ = load_run(RunDir(s2))  # adapters still separate here
    proc = build_processor(cfg, tok, model)
    image = make_world(cfg).sample("test", 0).image
    inputs = processor(images=image, text=proc.prompt_text("what color is the circle?"), return_tensors="pt")
    ids = torch.tensor([proc.prompt("what color is the circle?")])
    assert torch.equal(inputs["input_ids"], ids)
    with torch.no_grad():
        diff = (model(ids, proc.pixels(image)[None])[0] - model_hf(**inputs).logits).abs().max().item()
    assert diff <= 1e-4


def test_bad_hf_settings_are_one_line_errors(hf, tmp_path, capsys):
    from graft.cli import main

    out = str(tmp_path / "run")
    cases = [
        (["--set", f"lm.hf_path={tmp_path / 'nope'}"], "lm.hf_path: folder not found"),
        (["--set", f"vision.hf_path={hf['llama']}"], "is not a SigLIP or CLIP vision tower"),
        (["--set", f"lm.hf_path={hf['siglip']}"], "lm.hf_path"),
        (["--set", "lm.lora_rank=4", "--set", "train.freeze=[lm]"], "adapters would be frozen"),
        (["--set", "lm.lora_rank=4", "--set", "lm.lora_targets=[no_such_layer]"], "lm.lora_targets"),
    ]
    for args, message in cases:
        assert main(["train", "tiny", "--out", out, "--set", "train.progress=false", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_data_check_reads_records_as_the_run_will(hf, tmp_path):
    """`graft data check` (and `data show`) go through the one assembly path (graft/build.py): with
    lm.hf_path the LM's own tokenizer and chat template judge truncation and placeholders, with
    train.init_from the initialising run's tokenizer (a bug: both used to be graft's own)."""
    from graft.build import processor_for, resolve, tokenizer_for
    from graft.config_checks import apply_overrides
    from graft.data.check import check_data
    from graft.recipes import llava_stage1

    cfg = apply_overrides(llava_stage1(), [f"lm.hf_path={hf['qwen2']}", f"vision.hf_path={hf['siglip']}",
                                           "lm.max_seq_len=40"])
    before = repr(cfg)
    proc = processor_for(cfg)
    assert repr(cfg) == before  # the assembly path never changes the config it is given
    assert isinstance(proc, TemplateProcessor) and proc.tok.tok.name_or_path == str(hf["qwen2"])
    resolved, _ = resolve(cfg, proc.tok)
    assert proc.num_image_tokens == build_model(resolved, proc.tok).num_image_tokens  # the HF tower's grid
    result = check_data(cfg, proc, 20)
    assert result.used + sum(result.skipped.values()) == 20 and result.used > 0

    run = tmp_path / "tiny"
    cli("train", "tiny", "--out", str(run), *sets("train.steps=2", "eval.splits=", "train.progress=false"))
    init = apply_overrides(tiny(), [f"train.init_from={run}"])
    assert tokenizer_for(init).tok.to_str() == RunDir(run).tokenizer().tok.to_str()
    assert processor_for(init).tok.tok.to_str() == RunDir(run).tokenizer().tok.to_str()


def test_a_llama_folder_loads_into_the_built_in_decoder(hf, tmp_path):
    """lm.builtin=true: graft's own decoder with the folder's weights gives LlamaForCausalLM's
    logits, so a pretrained LM gets built-in options: here Flamingo's blocks, whose closed gates
    leave the pretrained LM's output unchanged."""
    from transformers import AutoModelForCausalLM

    from graft.models.decoder import LMConfig
    from graft.models.hf_backbones import load_into_builtin, resolve_lm

    cfg = resolve_lm(LMConfig(hf_path=str(hf["llama"]), builtin=True), 321)
    ours = load_into_builtin(cfg).eval()
    theirs = AutoModelForCausalLM.from_pretrained(hf["llama"]).eval()
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids)[..., :320], theirs(ids).logits, rtol=1e-5, atol=1e-5)
    run = tmp_path / "flamingo"
    cli("train", "shapes_flamingo", "--out", str(run), *sets(*QUICK, f"lm.hf_path={hf['llama']}", "lm.builtin=true",
                                                            "train.steps=2", "data.grid=3"))
    _, tok, model, _ = load_run(RunDir(run))
    proc = build_processor(RunDir(run).config(), tok, model)
    ids = torch.tensor([proc.prompt("what color is the circle?")])
    with torch.no_grad():  # 2 steps moved the gates off 0: close them again to compare with the LM alone
        for block in model.xattn:
            block.alpha_cross_attn.zero_()
            block.alpha_dense.zero_()
        assert torch.equal(model(ids, torch.randn(1, 3, 24, 24))[0], model.lm(input_ids=ids))
    from graft.errors import UserError

    for k in ("qwen2", "gpt2"):  # not Llama (Qwen2's attention has biases): refused in one line
        with pytest.raises(UserError, match="lm.builtin=true loads Llama folders"):
            load_into_builtin(resolve_lm(LMConfig(hf_path=str(hf[k]), builtin=True), 321))
