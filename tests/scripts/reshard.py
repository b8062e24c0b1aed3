"""A checkpoint saved on one process loads into FSDP2 on two, and the reverse, tensor for tensor
(model with tied weights, AdamW moments and steps). Run as: reshard.py DIR (one process: save, or
load what two saved), then under torchrun with 2 processes (load what one saved, then save)."""

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
from graft.train import checkpoint
from graft.train.runtime import setup

root = Path(sys.argv[1])
rt = setup("cpu", "fp32")
torch.manual_seed(0)
model, proc = tiny_vlm()
assert model.lm.lm_head.weight is model.lm.embed_tokens.weight  # a tied pair is part of the test
if rt.world_size > 1:
    from graft.train.parallel import blocks, shard

    shard(model, blocks(model), rt)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
world = ShapesWorld(32)


def step(n: int) -> None:
    s = world.sample("train", n + rt.rank)
    ids, labels = proc.conversation([(s.qa[0].question, s.qa[0].answer)])
    batch_loss(model, collate([(ids, labels, proc.pixels(s.image))], proc.tok.pad)).backward()
    opt.step()
    opt.zero_grad()


def full_state() -> dict:
    m, o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not m:  # ranks other than 0 get nothing with cpu_offload
        return {}
    flat = {f"model.{k}": v for k, v in m.items()}
    flat |= {f"optim.{name}.{k}": v for name, state in o["state"].items() for k, v in state.items()}
    return {k: v.clone().contiguous() for k, v in flat.items() if k != "model.lm.lm_head.weight"}


def check(ref: Path) -> None:
    got, want = full_state(), load_file(str(ref))
    if rt.rank == 0:
        assert sorted(got) == sorted(want), set(got) ^ set(want)
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, bad[:5]


def save(name: str, at: int) -> None:
    checkpoint.Saver(root / name, keep=1).save(at, model, opt, sched, {})
    state = full_state()
    if rt.rank == 0:
        save_file(state, str(root / f"{name}.safetensors"))


if rt.world_size == 1 and not (root / "one").exists():
    step(0), step(1)
    save("one", 2)
elif rt.world_size > 1:
    step(0)  # the optimizer has state before loading, as in a running trainer
    checkpoint.load_train_state(checkpoint.latest(root / "one"), model, opt, sched)
    check(root / "one.safetensors")
    step(2)
    save("two", 3)
else:
    checkpoint.load_train_state(checkpoint.latest(root / "two"), model, opt, sched)
    check(root / "two.safetensors")
if dist.is_initialized():
    dist.destroy_process_group()
print("resharded exactly", os.environ.get("RANK", "0"))
