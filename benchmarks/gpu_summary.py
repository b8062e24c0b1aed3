"""Summary of a `benchmarks/gpu.sh` run: the training figures as a README benchmark row.

Reads the run's `metrics.jsonl` (one record per `train.log_every` window; eval events skipped),
drops the first `--skip` windows (torch.compile's warm-up and recompiles), and prints the medians
of tokens/s, samples/s, MFU and data wait over the rest, the peak memory, whether torch.compile
compiled anything (from the run's `TORCH_LOGS=dynamo` log) and, with `--hf-log`, the speed
ratio lines of benchmarks/hf_llava_step.py. The table rows use the README's columns
(what | figure | command | date).

    python benchmarks/gpu_summary.py --run OUT/graft --log OUT/train.log --plan OUT/dry_run.txt \
        --skip 4 [--hf-log OUT/hf_llava.log] [--what "..."]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the graft run directory (holds metrics.jsonl)")
    p.add_argument("--log", required=True, help="the run's stdout + stderr, logged with TORCH_LOGS=dynamo")
    p.add_argument("--plan", required=True, help="the output of `graft train ... --dry-run`")
    p.add_argument("--skip", type=int, default=4, help="first windows left out (compile warm-up)")
    p.add_argument("--hf-log", help="the output of benchmarks/hf_llava_step.py")
    p.add_argument("--what", default="", help="settings for the table row's first column")
    return p.parse_args()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or "CPU"


def windows(run: Path, skip: int) -> tuple[list[dict], int]:
    """The training windows after the first `skip`, and how many there were in all."""
    if not (run / "metrics.jsonl").exists():
        raise SystemExit(f"gpu_summary: no {run / 'metrics.jsonl'}: the training logged nothing")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") != "eval" and "tokens_per_s" in r]
    if len(train) <= skip:
        raise SystemExit(f"gpu_summary: {len(train)} logged windows, none left after skipping {skip}")
    return train[skip:], len(train)


def compiled(log: str) -> tuple[int, str]:
    """Graphs torch.compile compiled, from dynamo's INFO log, and a line on them and their cost."""
    graphs = log.count("done compiler function inductor")
    seconds = re.findall(r"_compile\.compile_inner, ([\d.]+)", log)
    recompiles = log.count("Recompiling function")
    if graphs == 0:
        return 0, ("torch.compile: NOTHING COMPILED: every block ran eagerly although parallel.compile=true "
                   "(dynamo traced no frame; see the log)")
    spent = f", {float(seconds[-1]):.0f} s compiling" if seconds else ""
    return graphs, f"torch.compile: {graphs} graphs compiled ({recompiles} recompiles){spent}"


def params(plan: str) -> str:
    found = re.search(r"parameters\s+([\d,]+) total", plan)
    return f"{int(found.group(1).replace(',', '')) / 1e6:,.1f} M params" if found else "? params"


def main() -> None:
    args = parse()
    kept, total = windows(Path(args.run), args.skip)
    med = {k: statistics.median(r[k] for r in kept)
           for k in ("tokens_per_s", "samples_per_s", "mfu", "data_wait_frac")}
    peak = max(r["peak_mem_gb"] for r in kept)
    blocked = sum(r.get("ckpt_blocked_s", 0.0) for r in kept)
    # the step time includes fetching the batch: what the model alone sustains, without that wait
    compute_only = med["tokens_per_s"] / max(1e-9, 1 - med["data_wait_frac"])
    device, date = device_name(), datetime.date.today().isoformat()
    print(f"device: {device}   date: {date}   torch {torch.__version__}")
    graphs, compile_line = compiled(Path(args.log).read_text(errors="replace"))
    print(compile_line)
    print(f"windows: {len(kept)} of {total}, ending at steps {kept[0]['step']}-{kept[-1]['step']}; "
          f"the first {args.skip} left out as warm-up")
    print(f"median tokens/s {med['tokens_per_s']:,.0f} ({compute_only:,.0f} without the data wait), "
          f"samples/s {med['samples_per_s']:,.1f}, MFU {100 * med['mfu']:.1f} %, "
          f"data wait {100 * med['data_wait_frac']:.1f} %, peak memory {peak:.1f} GiB, "
          f"checkpoint blocking {blocked:.1f} s")
    where = f"1 GPU ({device})" if torch.cuda.is_available() else f"1 process ({device})"
    what = f"VLM training, {where}, {params(Path(args.plan).read_text())}" + (f", {args.what}" if args.what else "")
    what += "" if graphs else " (nothing compiled: the blocks ran eagerly)"
    print("\n| what | figure | command | date |\n|---|---|---|---|")
    print(f"| {what} | {med['tokens_per_s'] / 1e3:,.1f} k tokens/s, {med['samples_per_s']:,.0f} samples/s, "
          f"MFU {100 * med['mfu']:.1f} % (measured FLOPs), peak {peak:.1f} GiB, data wait "
          f"{100 * med['data_wait_frac']:.1f} % | `bash benchmarks/gpu.sh` | {date} |")
    if args.hf_log:
        hf = Path(args.hf_log).read_text()
        ratios = re.findall(r"speed ratio (.+?) / transformers: ([\d.]+)x", hf)  # one per graft variant
        size = re.search(r"\(([\d.]+) M params\), batch (\d+), \w+ (\w+)", hf)
        figure = "; ".join(f"{name}: {ratio}× HF's speed" for name, ratio in ratios) or "no ratio line (see the log)"
        setting = f"{float(size.group(1)):,.1f} M params, {size.group(3)}, batch {size.group(2)}" if size else "see the log"
        print(f"| VLM train step vs HF `LlavaForConditionalGeneration`, {where}, {setting} "
              f"| {figure} | `bash benchmarks/gpu.sh` | {date} |")


if __name__ == "__main__":
    main()
