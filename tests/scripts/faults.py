"""Faults injected into `graft train tiny` under torchrun (tests/test_parallel.py):

    faults.py nan OUT    rank 1's images are NaN from step 4 on (rank 0's stay finite)
    faults.py hang OUT   rank 1 sleeps 10 s before step 3 while rank 0 goes on (parallel.timeout_s=3)
"""

import os
import sys
import time

import torch

from graft.cli import main
from graft.data.loader import ShapesBatches

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
sys.exit(main(["train", "tiny", "--out", out, "--set", "parallel.kind=fsdp2", "--set", "train.steps=10",
               "--set", "train.ckpt_every=3", "--set", "train.max_skipped_steps=3", "--set", "train.log_every=1",
               "--set", "train.progress=false", "--set", "eval.splits=", "--set", "parallel.timeout_s=3"]))
