"""A checkpoint saved on one process loads into FSDP2 on two, and the reverse, tensor for tensor
(model with tied weights, AdamW moments and steps). Run as `torchrun --nproc_per_node=2 reshard.py
DIR`; one launch does all three parts:

1. rank 0 alone, before any process group exists, trains a plain model 2 steps and saves it (the
   other rank waits for it in the rendezvous);
2. both ranks shard the model with FSDP2, load what one process saved, check it, train a step and
   save;
3. after the group is gone, rank 0 alone loads what two processes saved into a plain model again.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_vlm

from graft.data.processor import collate
from graft.data.shapes import ShapesWorld
from graft.losses import batch_loss
from graft.trainer import checkpoint
from graft.trainer.runtime import Runtime, setup

root = Path(sys.argv[1])
world = ShapesWorld(32)
ALONE = Runtime(torch.device("cpu"), torch.float32)  # one process, no group


class Trainer:
    """A tiny VLM with its AdamW, on `rt` (sharded with FSDP2 over two processes)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        torch.manual_seed(0)
        self.model, self.proc = tiny_vlm()
        assert self.model.lm.lm_head.weight is self.model.lm.embed_tokens.weight  # a tied pair is part of the test
        if rt.world_size > 1:
            from graft.trainer.parallel import blocks, shard

            shard(self.model, blocks(self.model), rt)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)

    def step(self, n: int) -> None:
        s = world.sample("train", n + self.rt.rank)
        ids, labels = self.proc.conversation([(s.qa[0].question, s.qa[0].answer)])
        batch_loss(self.model, collate([(ids, labels, self.proc.pixels(s.image))], self.proc.tok.pad)).backward()
        self.opt.step()
        self.opt.zero_grad()

    def full_state(self) -> dict:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        m, o = get_state_dict(self.model, self.opt, options=options)
        if not m:  # ranks other than 0 get nothing with cpu_offload
            return {}
        flat = {f"model.{k}": v for k, v in m.items()}
        flat |= {f"optim.{name}.{k}": v for name, state in o["state"].items() for k, v in state.items()}
        return {k: v.clone().contiguous() for k, v in flat.items() if k != "model.lm.lm_head.weight"}

    def load_and_check(self, name: str) -> None:
        checkpoint.load_train_state(checkpoint.latest(root / name), self.model, self.opt, self.sched)
        got, want = self.full_state(), load_file(str(root / f"{name}.safetensors"))
        if self.rt.rank == 0:
            assert sorted(got) == sorted(want), set(got) ^ set(want)
            bad = [k for k in want if not torch.equal(got[k], want[k])]
            assert not bad, bad[:5]
            print(f"resharded exactly: {name}", flush=True)

    def save(self, name: str, at: int) -> None:
        checkpoint.Saver(root / name, keep=1).save(at, self.model, self.opt, self.sched, {})
        state = self.full_state()
        if self.rt.rank == 0:
            save_file(state, str(root / f"{name}.safetensors"))


rank = int(os.environ["RANK"])
if rank == 0:  # 1: one process
    one = Trainer(ALONE)
    one.step(0), one.step(1)
    one.save("one", 2)
rt = setup("cpu", "fp32")  # rank 1 waits here for rank 0
two = Trainer(rt)  # 2: FSDP2 on two processes
two.step(0)  # the optimizer has state before loading, as in a running trainer
two.load_and_check("one")
two.step(2)
two.save("two", 3)
dist.destroy_process_group()
if rank == 0:  # 3: one process again
    Trainer(ALONE).load_and_check("two")
# Skip the interpreter's teardown: under load gloo sometimes aborts in a C++ destructor there
# ("terminate called without an active exception", SIGABRT) after every check has passed (rank 1 of a
# fresh-clone run, 2026-12-06; as in contrastive_losses_dist.py).
sys.stdout.flush()
os._exit(0)
