"""The process-level settings of graft/trainer/runtime.py."""

import subprocess
import sys

import pytest

# a step's activations allocated, then all freed, 20 times; prints the page faults it caused
STEPS = """
import resource, sys, torch
from graft.trainer.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    xs = [torch.ones(10_000_000) for _ in range(5)]  # 5 x 40 MB
    return sum(float(x[-1]) for x in xs)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


PAGES = 20 * 5 * 10_000_000 * 4 // 4096  # the pages 20 steps would fault in if nothing were reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensor_memory_is_reused_without_page_faults():
    """Once runtime.setup has tuned malloc (CPU runs), a step's freed activations are reused: the
    20 steps fault in under 10 % of the pages they touch. By default glibc maps every block over
    its threshold afresh and unmaps it on free, so every step faults them in again (~10,000 faults
    per 40 MB block; ~4.9 million here on the development machines' glibc). How many a libc's default
    costs is its own business; the setting must make the difference wherever the default faults.
    Alone the tuned process faults in none of them (Intel Xeon, 5 runs); beside another busy test
    worker 29,297 (3 %) were measured: the kernel's background compaction moves pages, and touching a
    moved page is a minor fault. Hence 10 %, far below the default's 100 %."""
    default, kept = faults("default"), faults("keep")
    assert kept < PAGES // 10, (kept, PAGES)
    assert default < PAGES // 100 or kept < default // 10, (default, kept)
