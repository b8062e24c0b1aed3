"""What every test shares: no downloads, one thread per pytest-xdist worker, and trained runs that
several tests read (trained once per session, whichever worker asks first).

Tiers (docs/testing.md): `pytest -m "not slow"` is the edit-test loop; plain `pytest` (what CI runs,
README line 2, with `-n auto`) is everything."""

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from tests.torchrun_runs import ONE, TINY, here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one thread each, and so does every process a test starts (torchrun's
    # workers included). More threads per process would spin-wait against each other (DESIGN §3).
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`shared_run(name, make)` -> a directory that `make(dir)` filled once for the whole session.

    Across xdist workers too: the first to ask makes it under a file lock, the others wait and read
    it. Tests only read a shared run; one that writes into it (resume, eval.json) copies it first
    with `tests.helpers.copy_run`. A `make` that fails leaves nothing behind, so the next test fails the same way."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    root = root / "shared"
    root.mkdir(exist_ok=True)

    def get(name: str, make: Callable[[Path], None]) -> Path:
        path = root / name
        with FileLock(str(root / f"{name}.lock")):
            if not (path / ".complete").exists():
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir()
                try:
                    make(path)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
                (path / ".complete").touch()
        return path

    return get



def pytest_collection_modifyitems(config, items):
    """Slow tests first: under xdist the longest start while the many short ones fill the other
    workers, instead of one long test ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each


@pytest.fixture
def one_process(shared_run):
    """`tiny`, 5 steps, one process at batch 32 in 4 micro-batches: the reference of the torchrun
    tests (test_parallel.py, test_compile.py)."""
    return shared_run("tiny_one_process", lambda out: here(*TINY, "--out", str(out), *ONE))
