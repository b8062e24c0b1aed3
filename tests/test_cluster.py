"""Cluster launch: the templates in deploy/ and `graft train --dry-run` (graft/plan.py).

The graft command of each template is run with `--dry-run` (its launcher replaced by `python -m
graft`), so a template naming an unknown key or recipe fails here. The activation estimate is
checked against what autograd really saves for the backward of a tiny VLM on CPU, in fp32, in bf16
(FSDP2's mixed precision) and under bf16 autocast, with and without activation checkpointing.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from graft.build import assemble, build_model, resolve, tokenizer_for
from graft.plan import (
    AUTOCAST,
    BF16,
    FP32,
    Shape,
    activations,
    decoder_block,
    dry_run,
    state_bytes,
)
from graft.recipes import RECIPES
from graft.trainer import parallel
from graft.cli import main
from tests.helpers import cli, one_line_error, tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def listing(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ---- the templates --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory) -> Path:
    """A few conversations in LLaVA-1.5's layout (the JSON beside its image folders), as the
    templates expect under $DATA."""
    data = tmp_path_factory.mktemp("data")
    assert main(["data", "export-shapes", "--format", "llava", "--out", str(data), "--n", "8"]) == 0
    (data / "llava.json").rename(data / "llava_v1_5_mix665k.json")
    return data


def slurm_command() -> str:
    """The srun line of deploy/slurm.sbatch, continuation lines joined."""
    text = (DEPLOY / "slurm.sbatch").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
    return line


def test_slurm_template_is_valid_bash_and_launches_torchrun_on_every_node():
    subprocess.run(["bash", "-n", str(DEPLOY / "slurm.sbatch")], check=True)
    text = (DEPLOY / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert re.search(r"#SBATCH --signal=TERM@\d+", text)  # SIGTERM before the limit: a checkpoint
    line = slurm_command()
    for flag in ("torchrun", '--nnodes="$SLURM_NNODES"', "--nproc_per_node=8", "--rdzv_backend=c10d",
                 '--rdzv_endpoint="$head:29500"', "-m graft train llava_7b", "--out"):
        assert flag in line, flag


def test_slurm_command_dry_runs(llava_data, tmp_path):
    command = re.sub(r"^\s*srun .*? -m graft ", f"{shlex.quote(sys.executable)} -m graft ", slurm_command())
    env = os.environ | {"DATA": str(llava_data), "OUT": str(tmp_path / "run"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", "-c", command + " --dry-run --gpus 16"], capture_output=True, text=True, check=False,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "parallel.kind=fsdp2" in out.stdout and "global batch 128" in out.stdout
    assert listing(tmp_path) == set()  # $OUT is not created


def pytorchjob() -> dict:
    return yaml.safe_load((DEPLOY / "pytorchjob.yaml").read_text())


def test_pytorchjob_is_two_pods_of_eight_gpus_with_elastic_restarts():
    job = pytorchjob()
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["elasticPolicy"]["rdzvBackend"] == "c10d" and spec["elasticPolicy"]["maxRestarts"] > 0
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["command"][:3] == ["torchrun", "-m", "graft"]
    env = {e["name"]: int(e["value"]) for e in container["env"] if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] < pod["terminationGracePeriodSeconds"]


def test_pytorchjob_command_dry_runs(llava_data, tmp_path, capsys, monkeypatch):
    (container,) = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    variables = {e["name"]: e["value"] for e in container["env"]} | {"DATA": str(llava_data)}
    args = [re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], a)  # $(VAR), as Kubernetes expands it
            for a in container["command"][3:]]
    args[args.index("--out") + 1] = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *args, "--dry-run", "--gpus", "16")
    assert code == 0, err
    assert "parallel.kind=fsdp2" in out
    assert listing(tmp_path) == set()


def test_dockerfile_builds_on_cuda_pytorch_and_installs_graft():
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert any(re.match(r"FROM pytorch/pytorch:\S+-cuda\S+", line) for line in lines)
    assert any(line.startswith("RUN pip install") and "/opt/graft" in line for line in lines)
    assert 'CMD ["graft", "demo"]' in lines
    for line in lines:  # everything it copies exists
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


# ---- graft train --dry-run -----------------------------------------------------------------------


def test_dry_run_writes_nothing_and_counts_the_real_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", "tiny", "--dry-run", "--out", "runs/x", "--set", "train.freeze=[vision]")
    assert code == 0, err
    assert listing(tmp_path) == set()  # no run directory, no tokenizer, nothing
    cfg = RECIPES["tiny"]()
    cfg.train.freeze = ["vision"]
    tok = tokenizer_for(cfg)
    model = assemble(resolve(cfg, tok)[0], tok)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < total
    assert f"parameters      {total:,} total, {trainable:,} trainable" in out
    assert "world size      1" in out and "activations" in out


@pytest.mark.parametrize("args,message", [
    (["--set", "lm.layerz=3"], "unknown config key 'lm.layerz'"),
    (["--set", "parallel.kind=zero3"], "parallel.kind='zero3'"),
    (["--gpus", "0"], "--gpus=0"),
])
def test_dry_run_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli(capsys, "train", "tiny", "--dry-run", *args), message)
    assert listing(tmp_path) == set()


def test_gpus_without_dry_run_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli(capsys, "train", "tiny", "--gpus", "8"), "--dry-run")
    assert listing(tmp_path) == set()


def test_world_size_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, out, err = cli(capsys, "train", "tiny", "--dry-run")
    assert code == 0, err
    assert "world size      4 (WORLD_SIZE)" in out and "parallel.kind=ddp" in out


def test_fsdp2_divides_weights_gradients_and_optimizer_by_the_world_size(tmp_path):
    cfg = RECIPES["llava_7b"]()
    tokenizer().save(tmp_path / "tokenizer.json")  # skips training one on the 378 px world (~15 s)
    cfg.data.tokenizer = str(tmp_path / "tokenizer.json")
    one, eight = dry_run(cfg, "llava_7b", gpus=1), dry_run(cfg, "llava_7b", gpus=8)
    assert one.kind == eight.kind == "fsdp2" and eight.precision is BF16
    assert eight.memory["optimizer"] == pytest.approx(one.memory["optimizer"] / 8, rel=1e-6)
    ratio = ((eight.memory["parameters"] + eight.memory["optimizer"])
             / (one.memory["parameters"] + one.memory["optimizer"]))
    assert 1 / 8 < ratio < 0.15  # 1/8 plus the gathered bf16 units, which every process holds in turn
    assert eight.memory["activations"] == one.memory["activations"]
    cfg.parallel.kind = "ddp"
    ddp = dry_run(cfg, "llava_7b", gpus=8)
    assert ddp.memory["optimizer"] == one.memory["optimizer"]  # DDP keeps everything on every process
    assert ddp.memory["gradients"] == 2 * 4 * ddp.counts["total"][1]  # + its all-reduce buckets


# ---- the activation estimate against autograd's saved tensors -------------------------------------

VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "UnsafeViewBackward0", "ExpandBackward0"}


def _weight_cast(t: torch.Tensor) -> bool:
    """A bf16 copy of a weight made by autocast (its cache): counted with the parameters, not here."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in VIEWS:
        fn = fn.next_functions[0][0]
    return (fn is not None and type(fn).__name__ == "ToCopyBackward0"
            and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad")


def saved_bytes(model, batch, autocast: bool = False, block=None) -> tuple[int, int, int]:
    """Bytes of the distinct storages autograd saves in a forward with the loss (parameters
    excluded): activations, autocast's weight casts, and those first saved inside `block`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    acts, casts, inside, running = {}, {}, {}, [False]
    if block is not None:
        block.register_forward_pre_hook(lambda *_: running.__setitem__(0, True))
        block.register_forward_hook(lambda *_: running.__setitem__(0, False))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in acts and key not in casts:
            (casts if _weight_cast(t) else acts)[key] = t.untyped_storage().nbytes()
            if running[0] and key in acts:
                inside[key] = acts[key]
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(**batch)
    return sum(acts.values()), sum(casts.values()), sum(inside.values())


ROWS, SEQ, SIZE = 3, 80, 32


def tiny_vlm(kv_heads: int, image_attention: str):
    """A small VLM (GQA or not; causal or bidirectional image attention) and a batch of ROWS rows of
    SEQ tokens, one image each."""
    cfg = RECIPES["tiny"]()
    v, lm = cfg.vision, cfg.lm
    v.image_size, v.patch_size, v.hidden_size, v.layers, v.heads, v.intermediate_size = SIZE, 8, 48, 2, 2, 96
    lm.hidden_size, lm.layers, lm.heads, lm.kv_heads, lm.intermediate_size = 64, 3, 4, kv_heads, 160
    lm.image_attention, cfg.data.pack = image_attention, False
    tok = tokenizer()
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (ROWS, SEQ), generator=g)
    ids[ids == tok.image] = 10
    n = model.num_image_tokens
    ids[:, 1:1 + n] = tok.image
    labels = ids.clone()
    labels[:, :1 + n] = -100
    batch = {"input_ids": ids, "pixel_values": torch.randn(ROWS, 3, SIZE, SIZE, generator=g), "labels": labels}
    return cfg, model, batch


@pytest.mark.parametrize("precision", [FP32, BF16, AUTOCAST], ids=["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("kv_heads,image_attention", [(2, "causal"), (4, "bidirectional")])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
def test_activation_estimate_matches_what_autograd_saves(precision, kv_heads, image_attention, checkpointing):
    cfg, model, batch = tiny_vlm(kv_heads, image_attention)
    if precision is BF16:  # FSDP2's MixedPrecisionPolicy: bf16 weights in the forward, bf16 inputs
        model = model.to(torch.bfloat16)
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
    if checkpointing:  # per block, as the trainer applies it
        cfg.parallel.kind, cfg.parallel.activation_checkpointing = "none", True
        model = parallel.apply(model, cfg, SimpleNamespace(world_size=1))
    measured, casts, in_block = saved_bytes(model, batch, precision is AUTOCAST, block=model.lm.layers[1])
    shape = Shape(ROWS, SEQ, ROWS, model.vision.num_patches, model.num_image_tokens)
    terms, notes = activations(cfg, shape, precision, {"vision": True, "connector": True, "lm": True}, checkpointing)
    assert not notes
    # Alive but not saved, so invisible to the hooks: the attention mask the decoder's context holds,
    # and (checkpointed) the RoPE tables the recomputation keeps; logits and the recompute come later.
    held = ROWS * SEQ * SEQ if image_attention == "bidirectional" else 0
    if checkpointing:
        held += ROWS * SEQ * 2 * (cfg.lm.hidden_size // cfg.lm.heads) * precision.stream
    estimate = sum(v for k, v in terms.items() if k not in ("logits", "recompute")) - held
    # CPU keeps LayerNorm statistics of bf16 inputs in bf16, CUDA (and the formula) in fp32: 0.03 %
    assert measured == pytest.approx(estimate, rel=2e-3), (measured, estimate)
    lm = cfg.lm
    block = ROWS * SEQ * decoder_block(lm.hidden_size, lm.intermediate_size, lm.heads, precision,
                                       SEQ if image_attention == "bidirectional" else 0,
                                       kv=lm.kv_heads * lm.hidden_size // lm.heads)  # CPU: GQA in the kernel
    if checkpointing:  # the largest block is recomputed in the backward: here a decoder block
        assert terms["recompute"] == block
    else:  # what one decoder block saves, measured alone
        assert in_block == block
    if precision is AUTOCAST and not checkpointing:  # the bf16 weight copies plan.py adds to the parameters
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        biases = sum(m.bias.numel() for m in model.modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None)
        copies = state_bytes(model, "none", AUTOCAST, 1)["parameters"] - 4 * total
        assert casts == copies - 2 * biases, (casts, copies)  # bias copies are cached, not saved
