"""Faults injected into `graft train tiny` under torchrun (tests/test_parallel.py):

    faults.py nan OUT    rank 1's images are NaN from step 4 on (rank 0's stay finite)
    faults.py hang OUT   rank 1 sleeps 10 s before step 3 while rank 0 goes on (parallel.timeout_s=3)
    faults.py ckptkill OUT   rank 1 is killed (SIGKILL) while writing the checkpoint of step 6
    faults.py none OUT   no fault: the reference, and the command that resumes
"""

import os
import signal
import sys
import time

import torch

from graft.cli import main
from graft.data.loader import ShapesBatches
from graft.train import checkpoint

mode, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
real_batch = ShapesBatches.batch


def poisoned(self, step, micro):
    batch = real_batch(self, step, micro)
    if mode == "nan" and rank == 1 and step >= 3:
        batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
    if mode == "hang" and rank == 1 and step == 2:
        time.sleep(10)
    return batch


ShapesBatches.batch = poisoned
real_save_file = checkpoint.save_file


def dies_while_writing(tensors, path, *args, **kwargs):
    real_save_file(tensors, path, *args, **kwargs)
    if mode == "ckptkill" and rank == 1 and ".tmp-step_00000006" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # its RNG file written, its model and optimizer shards not


checkpoint.save_file = dies_while_writing
sys.exit(main(["train", "tiny", "--out", out, "--set", "parallel.kind=fsdp2", "--set", "train.steps=10",
               "--set", "train.ckpt_every=3", "--set", "train.max_skipped_steps=3", "--set", "train.log_every=1",
               "--set", "train.progress=false", "--set", "eval.splits=", "--set", f"parallel.timeout_s={3 if mode == 'hang' else 60}"]))
