"""Small builders shared by the tests."""

import shutil
import time
from pathlib import Path

import torch

from graft.build import build_model, build_stream
from graft.data.processor import Processor
from graft.data.shapes import ShapesWorld
from graft.data.tokenizer import ChatTokenizer, world_corpus
from graft.models.connectors import ConnectorConfig
from graft.models.decoder import LMConfig
from graft.models.vit import VisionConfig
from graft.models.vlm import VLM
from graft.trainer.runtime import Runtime

_TOK = None
# The series learning runs' LM: 2 layers of 64 (the recipe's are 3 of 128), a third of the CPU time per step
SMALL_LM = ["--set", "lm.layers=2", "--set", "lm.hidden_size=64", "--set", "lm.intermediate_size=192"]


def tokenizer() -> ChatTokenizer:
    global _TOK
    if _TOK is None:
        _TOK = ChatTokenizer.train(world_corpus(ShapesWorld(), n=500), 384)
    return _TOK


def world_batches(cfg, proc):
    """One process's training stream of `cfg` (its data source, packing as the run would)."""
    return build_stream(cfg, proc, Runtime(torch.device("cpu"), torch.float32))


def tiny_vlm(kind: str = "mlp") -> tuple[VLM, Processor]:
    tok = tokenizer()
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate_size=64)
    lm = LMConfig(vocab_size=len(tok), hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)
    model = VLM(vision, ConnectorConfig(kind), lm, tok.image)
    return model, Processor(tok, 32, model.num_image_tokens, 128)


# quiet short runs for the evaluation tests (tests/test_eval_tasks.py, test_eval_vqa_data.py)
EVAL_RUN_SETS = ["--set", "train.progress=false", "--set", "eval.splits=", "--set", "train.batch_size=32",
                 "--set", "train.log_every=5", "--set", "train.peak_flops=1e11"]


def with_and_without(on, off, tok):
    """The models of configs `on` and `off` (one with a training-only head, one without) from the
    same seed; the head is built last, so every other weight is the same in both (asserted)."""
    torch.manual_seed(0)
    model = build_model(on, tok)
    torch.manual_seed(0)
    plain = build_model(off, tok)
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), model.state_dict().values()))
    return model, plain


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a shared run (conftest's `shared_run`), for a test that writes into it."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`graft ARGS` in this process: (exit code, stdout, stderr). The CLI's error paths are tested
    this way (a subprocess costs ~2 s of imports); test_config.py keeps one real process."""
    from graft.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: a bad command line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result: tuple[int, str, str], needle: str) -> None:
    """Exit 2 and one line on stderr naming `needle`, no traceback (DESIGN.md's CLI contract)."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err)
    assert "Traceback" not in err


def wait_for(paths: list[Path], proc, guard_s: float = 300, detail=lambda: "") -> None:
    """Until every path exists and holds something: markers a fault script writes when its process
    has paused where the test wants it. The deadline only keeps a broken run from hanging the
    suite; nothing races the run, which waits for the test. `detail()` adds to a failure."""
    deadline = time.monotonic() + guard_s
    while not all(p.exists() and p.read_text() for p in paths):
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before it paused {detail()}"
        assert time.monotonic() < deadline, f"not paused after {guard_s} s {detail()}"
        time.sleep(0.05)


def assert_refused(tmp_path, capsys, cases) -> None:
    """Each (recipe, --set items, needle): `graft train` exits 2 with one line of stderr holding
    `needle`, and writes no run directory."""
    from graft.cli import main

    for name, sets, needle in cases:
        out = tmp_path / "refused"
        assert main(["train", name, "--out", str(out), *(a for s in sets for a in ("--set", s))]) == 2, (name, sets)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (name, sets, err)
        assert not out.exists(), (name, sets)
