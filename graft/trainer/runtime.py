"""Where a run executes: process group, device, precision and the machine's peak FLOP/s.

Everything is read from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), so the
same command runs on one CPU process or many GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import os
import re
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from graft.errors import Hung

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU on GPUs.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    rank: int = 0
    world_size: int = 1
    timeout_s: float = 600
    monitor: object = None  # a gloo group for naming unresponsive ranks (hung)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def setup(device: str = "auto", precision: str = "auto", timeout_s: float = 600, group: bool = False) -> Runtime:
    """The process group (from torchrun's environment; a collective that waits longer than
    `timeout_s` fails the run, naming the operation), the device and the autocast dtype. `group`:
    a group even for one process without torchrun (FSDP2 shards over a device mesh)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        keep_freed_memory()
    monitor = None
    if world_size > 1:
        if use_cuda:  # NCCL's flight recorder: the last collectives of each rank, dumped on a timeout
            os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
            os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                    store=_attempt_store(rank, world_size, timeout_s), rank=rank, world_size=world_size)
        monitor = dist.new_group(backend="gloo")
    elif group and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(dev, _dtype(precision, dev), rank, world_size, timeout_s, monitor)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory of freed tensors for the next step instead of handing it
    back to the OS. By default blocks above a few MB are mmap'ed and unmapped on free, so every CPU
    step page-faults its activations in again: 23,000 faults and 38 ms of a 190 ms demo step,
    measured; 8 % more samples/s in `graft train shapes_vqa` with this. Returns whether it took
    (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim, mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    # the largest mmap threshold this glibc takes (32 MB is every 64-bit glibc's documented limit)
    took = any(libc.mallopt(mmap, size) for size in (1 << 30, 1 << 25))
    return took and bool(libc.mallopt(trim, 1 << 30))


def teardown() -> None:
    """Every process leaves together and closes its process groups: a process that exits with its
    group open can abort (std::terminate) once the store it talks to is gone, failing a finished run."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _attempt_store(rank: int, world_size: int, timeout_s: float):
    """torchrun's store, with keys prefixed by the restart attempt. Without the prefix, processes
    restarted by `torchrun --max-restarts` read the addresses the previous attempt left in the store
    and never connect (seen with gloo on torch 2.13)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's agent serves it
    store = dist.TCPStore(host, port, world_size, is_master=not hosted and rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"graft/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AVX512-BF16 or AMX-BF16): bf16 autocast is then
    faster than fp32 (measured 1.29x at the demo size); without them it is 10-500x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on GPUs by default; on CPUs only when asked (train.precision=bf16), with a
    warning where the CPU has no bf16 units."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            print("graft: train.precision=bf16 on a CPU without bf16 units (no AVX512-BF16 or AMX): expect it "
                  "10-500x slower than fp32", file=sys.stderr, flush=True)
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def peak_flops(rt: Runtime, configured: float = 0.0) -> float:
    """FLOP/s the MFU is measured against: configured, datasheet (GPU) or a measured matmul (CPU)."""
    if configured > 0:
        return configured
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if peak is None:
            peak = 989e12
            if rt.is_main:
                print(f"MFU: no datasheet peak for {name!r}; measured against 989 TFLOP/s (H100 bf16). "
                      "Set train.peak_flops for a true figure.", flush=True)
        return peak
    return _cpu_peak(torch.get_num_threads())


@functools.lru_cache(maxsize=4)
def _cpu_peak(threads: int) -> float:
    """`measure_matmul_flops` once per process and thread count (`graft compare` trains many runs in one)."""
    return measure_matmul_flops()


def measure_matmul_flops(n: int = 1024, seconds: float = 0.2) -> float:
    """Best fp32 matmul rate over ~`seconds` on this CPU (~20 products of 1024² at 2 threads): the
    practical peak, measured at the start of a process's first CPU run."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def all_sum(values: dict, rt: Runtime) -> dict:
    """Each value summed over every rank (ints stay ints); the same dict on one process."""
    if rt.world_size == 1:
        return dict(values)
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return {k: type(v)(x) if isinstance(v, int) else x for (k, v), x in zip(values.items(), t.tolist())}


def peak_memory(rt: Runtime) -> int:
    """Bytes: the most this process's GPU memory allocator has held, or on CPUs its peak resident size."""
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def hung(error: Exception, rt: Runtime, step: int):
    """If `error` is a collective's timeout: a `Hung` naming the operation this rank waited in and
    the ranks that do not answer a monitored barrier (PyTorch's own check); else None."""
    if rt.world_size == 1 or "timed out" not in str(error).lower():
        return None
    frames = traceback.extract_tb(error.__traceback__)
    torch_frames = [f for f in frames if "/torch/" in f.filename]
    op = torch_frames[-1].name if torch_frames else "a collective"
    ours = [f for f in frames if "/graft/" in f.filename]
    where = f" (called from {Path(ours[-1].filename).name}:{ours[-1].name})" if ours else ""
    try:
        dist.monitored_barrier(group=rt.monitor, timeout=datetime.timedelta(seconds=min(rt.timeout_s, 30)),
                               wait_all_ranks=True)
        silent = "every rank answers now"
    except RuntimeError as e:
        ranks = re.search(r"Ranks? ([\d, ]+) failed", str(e))
        silent = f"rank {ranks.group(1).strip()} did not answer" if ranks else str(e).splitlines()[0]
    return Hung(f"rank {rt.rank} waited {rt.timeout_s:g} s in {op}{where} at step {step + 1}; {silent} "
                f"(parallel.timeout_s={rt.timeout_s:g}). Its log shows where it is; the same command resumes "
                "from the latest checkpoint.")
