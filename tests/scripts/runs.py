"""Several `graft` runs in one torchrun launch: the interpreter start-up and the imports (most of a
tiny run's seconds) are paid once. Each run is graft's CLI `main()` with its own arguments, as
`torchrun -m graft ARGS` would run it:

    torchrun --nproc_per_node=2 runs.py ARGS1 -- ARGS2 [-- ARGS3 ...]

Every run sets up and tears down its own process group; each gets its own key prefix in torchrun's
store (graft's keys would collide with the previous run's otherwise), and torch.compile's caches are
reset between runs. The script stops at the first run that fails, with its exit code.
"""

import sys

import torch
import torch.distributed as dist

from graft.cli import main
from graft.trainer import runtime

real_store = runtime._attempt_store


def runs(argv: list[str]) -> list[list[str]]:
    found = [[]]
    for arg in argv:
        if arg == "--":
            found.append([])
        else:
            found[-1].append(arg)
    return found


for i, args in enumerate(runs(sys.argv[1:])):
    runtime._attempt_store = lambda *a, i=i: dist.PrefixStore(f"run_{i}", real_store(*a))
    torch._dynamo.reset()
    code = main(args)
    if code:
        sys.exit(code)
