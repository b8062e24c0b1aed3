"""Faults injected at a known point of a real `graft` run: graft's own CLI `main()` runs the
arguments after `--`, with one hook patched in. Used by tests/test_parallel.py (under torchrun)
and tests/test_resume.py (one process).

    faults.py FAULT STEP [MARKER] -- train tiny --out OUT ...

STEP counts as the metrics log does (step 1 is the first). FAULT is one of:

    pause     every process, while drawing step STEP's batches (steps before it done and logged),
              writes MARKER.rank<r> (its pid) and waits there until a signal reaches it: SIGKILL
              ends it there; SIGINT/SIGTERM (graft's handler only sets a flag) let step STEP go on.
              Once per MARKER: a process restarted by torchrun runs on without pausing.
    nan       rank 1's images are NaN from step STEP on (rank 0's stay finite)
    hang      rank 1 stops answering at step STEP: it waits, as `pause` does but without a marker,
              until a signal arrives (torchrun's SIGTERM once rank 0 has failed)
    ckptkill  rank 1 is killed (SIGKILL) while writing the checkpoint of step STEP: its RNG file
              written, its model and optimizer shards not

The test waits for the marker (a file appears only once the process is where the fault puts it),
then signals: no polling window that a loaded or a fast machine could miss.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch

from graft.cli import main
from graft.data.loader import IndexedBatches
from graft.trainer import checkpoint
from graft.trainer.stop import StopOnSignal

fault, at = sys.argv[1], int(sys.argv[2])
marker = Path(sys.argv[3]) if sys.argv[3] != "--" else None
graft_args = sys.argv[sys.argv.index("--") + 1:]
rank = int(os.environ.get("RANK", "0"))
signalled = False  # set when graft's SIGINT/SIGTERM handler has run in this process

real_handle = StopOnSignal._handle


def noting_handle(self, signum, frame):
    global signalled
    signalled = True
    real_handle(self, signum, frame)


def wait_for_a_signal() -> None:
    # graft's handler returns after setting its flag, and Python resumes a sleep after a handler
    # that returns: so look at `signalled` between short sleeps (it is set even if the signal
    # came before this loop started).
    while not signalled:
        time.sleep(0.01)


real_batch = IndexedBatches.batch


def faulty_batch(self, step, micro):  # step counts from 0 here
    if fault == "pause" and step + 1 == at and micro == 0:
        mine = marker.with_name(f"{marker.name}.rank{rank}")
        if not mine.exists():  # a torchrun restart finds it and runs on
            mine.write_text(str(os.getpid()))
            wait_for_a_signal()
    if fault == "hang" and rank == 1 and step + 1 == at and micro == 0:
        wait_for_a_signal()
    batch = real_batch(self, step, micro)
    if fault == "nan" and rank == 1 and step + 1 >= at:
        batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
    return batch


real_save_file = checkpoint.save_file


def dies_while_writing(tensors, path, *args, **kwargs):
    real_save_file(tensors, path, *args, **kwargs)
    if fault == "ckptkill" and rank == 1 and f".tmp-step_{at:08d}" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)


assert fault in ("pause", "nan", "hang", "ckptkill"), fault
StopOnSignal._handle = noting_handle
IndexedBatches.batch = faulty_batch
checkpoint.save_file = dies_while_writing
sys.exit(main(graft_args))
