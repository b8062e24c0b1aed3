"""The trainer: build → resume → loop (micro-batches, guard, clip, step, log, checkpoint, eval).

Re-running the same command on the same run directory resumes from the latest complete
checkpoint with model, optimiser, scheduler, RNG and data position restored, so the losses that
follow equal those of an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from graft import atomic
from graft import config as config_mod
from graft.build import assemble, resolve, tokenizer_for
from graft.config import Config
from graft.data.sources import build_stream
from graft.designs import design
from graft.errors import Stopped, UserError
from graft.eval.harness import entries, evaluate, unprefixed
from graft.losses import weighted
from graft.report import write_report
from graft.rundir import RunDir, build_processor
from graft.train import checkpoint, runtime
from graft.train.flops import MeasuredFlops
from graft.train.metrics import MetricsLog
from graft.train.optim import build_optimizer, build_scheduler
from graft.train.stop import SkipGuard, StopOnSignal

# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.ckpt_every",
                     "train.max_skipped_steps", "train.keep_checkpoints", "train.eval_every", "eval.")


def train(cfg: Config, out: str | Path) -> dict:
    """Train `cfg` into run directory `out`; returns the final evaluation (and writes report.md)."""
    started = time.perf_counter()
    run = RunDir(out)
    rt = runtime.setup(cfg.train.device, cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    tok = tokenizer_for(cfg, run)
    cfg, changes = resolve(cfg, tok)
    if changes and rt.is_main:
        print(f"vision.init_from: took {', '.join(changes)} from {cfg.vision.init_from}", flush=True)
    _prepare_run_dir(cfg, tok, run, rt)
    model = assemble(cfg, tok)
    model.to(rt.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    start = _resume(run, optimizer, scheduler, model, rt)
    ddp = DDP(model) if rt.world_size > 1 else None
    proc = build_processor(cfg, tok, model)
    stream = build_stream(cfg, proc, rt, run.latest_checkpoint() if start else None)
    log = MetricsLog(run.path, start, enabled=rt.is_main)
    peak = runtime.peak_flops(rt, cfg.train.peak_flops)
    bar = _progress(cfg, start, rt)
    window, flops, guard = _Window(), MeasuredFlops(), SkipGuard(cfg.train.max_skipped_steps)
    with StopOnSignal() as stop:
        for step in range(start, cfg.train.steps):
            loss, grad_norm, stats = _train_step(ddp or model, model, stream, optimizer, cfg, rt, step, flops)
            scheduler.step()
            window.add(stats)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                record = window.record(done, loss, grad_norm, scheduler, rt, peak)  # loss: global already
                record |= stream.stats(rt)  # data_skipped counts by reason, summed over ranks
                log.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            guard.update(stats["skipped"], done, run.latest_checkpoint())  # Diverged after too many in a row
            signum = stop.requested(rt)  # SIGINT / SIGTERM: checkpoint this step, then stop
            if signum or done % cfg.train.ckpt_every == 0 or done == cfg.train.steps:
                _save(run, done, model, optimizer, scheduler, cfg, rt, stream.state_dict(rt))
            if signum:
                _stop(signum, done, cfg, run, (bar, stream, log))
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps and rt.is_main:
                log.log({"step": done, "event": "eval", **evaluate(model, proc, cfg, out=run.path)})
    if bar is not None:
        bar.close()
    data_summary = stream.summary(rt)
    stream.close()
    if rt.is_main and data_summary:
        print(data_summary, flush=True)
    results = {}
    if rt.is_main:
        results = evaluate(model, proc, cfg, out=run.path)
        log.log({"step": cfg.train.steps, "event": "eval", **results})
        atomic.write_text(run.eval_path, json.dumps(results, indent=1))
    log.close()
    if rt.is_main:
        write_report(run.path, cfg.name, results, time.perf_counter() - started, unprefixed(entries(cfg)))
    return results


def _stop(signum: int, done: int, cfg: Config, run: RunDir, open_things) -> None:
    """After a signal: the step's checkpoint is saved; close what is open and say where it stopped."""
    for thing in open_things:
        if thing is not None:
            thing.close()
    raise Stopped(signum, done, cfg.train.steps, str(checkpoint.step_dir(run.checkpoints, done)))


def _prepare_run_dir(cfg: Config, tok, run: RunDir, rt) -> None:
    """Write (or check against the run's) config.yaml and the tokenizer."""
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {run.path} exists and is not a directory")
    if run.config_path.exists():
        _check_same_run(run.config(), cfg, run)
    if rt.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.has_tokenizer():
            run.save_tokenizer(tok)
        config_mod.save(cfg, run.config_path)
        checkpoint.clean_partial(run.checkpoints)
    if rt.world_size > 1:
        torch.distributed.barrier()


def _check_same_run(old: Config, new: Config, run: RunDir) -> None:
    a, b = _flat(config_mod.to_dict(old)), _flat(config_mod.to_dict(new))
    if b.get("lm.vocab_size") == 0:
        b["lm.vocab_size"] = a.get("lm.vocab_size")
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES):
            raise UserError(
                f"{run.path} holds a run with {key}={a.get(key)!r}, not {b.get(key)!r}; "
                "use another --out, or the same settings to resume"
            )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _resume(run: RunDir, optimizer, scheduler, model, rt) -> int:
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return 0
    checkpoint.load_weights(model, ckpt)
    meta = checkpoint.load_train_state(ckpt, optimizer, scheduler)
    if rt.is_main:
        print(f"resuming from {ckpt} (step {meta['step']})", flush=True)
    return int(meta["step"])


def _train_step(engine, model, stream, optimizer, cfg: Config, rt, step: int, flops: MeasuredFlops):
    """One optimiser step over grad_accum micro-batches; skips the update if gradients are non-finite.

    Each named loss of the model is a local sum; it is divided by what it counts over every
    micro-batch and process (`model.loss_counts`), weighted by `train.objectives`, and multiplied
    by the world size (DDP averages gradients over ranks), so that the gradient is the global
    batch's. Returns the weighted loss, the gradient norm, and statistics with `loss/<name>`."""
    t0 = time.perf_counter()
    accum, entry = cfg.train.grad_accum, design(cfg.model)
    batches = [{k: v.to(rt.device, non_blocking=True) for k, v in stream.batch(step, micro).items()}
               for micro in range(accum)]
    data_s = time.perf_counter() - t0
    counts = runtime.all_sum(_sum_counts(model.loss_counts(**b) for b in batches), rt)
    weights = {name: cfg.train.objectives.get(name, 1.0) for name in counts}
    sums = dict.fromkeys(counts, 0.0)
    tc = time.perf_counter()
    step_flops = sum(flops(model, b) for b in batches)  # counted once per new shape, then cached
    counting = time.perf_counter() - tc  # not training time: left out of the step's time
    images = tokens = 0
    optimizer.zero_grad(set_to_none=True)
    for micro, batch in enumerate(batches):
        sync = micro == accum - 1 or not isinstance(engine, DDP)
        with (engine.no_sync() if not sync else contextlib.nullcontext()), rt.autocast():
            _, losses = engine(**batch)
        objective = weighted(losses, counts, weights)
        (objective * rt.world_size).backward()
        for name, value in losses.items():
            sums[name] += value.item()
        images += batch["pixel_values"].shape[0]
        tokens += entry.tokens(batch, stream.proc.tok.pad)
    named = {name: total / max(counts[name], 1) for name, total in runtime.all_sum(sums, rt).items()}
    loss_sum = sum(weights[name] * named[name] for name in weights)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    skipped = not math.isfinite(float(grad_norm))  # same on every rank: grads are already all-reduced
    if skipped:
        optimizer.zero_grad(set_to_none=True)  # a non-finite update never reaches the weights
    else:
        optimizer.step()
    stats = {"time": time.perf_counter() - t0 - counting, "data": data_s, "images": images, "tokens": tokens,
             "flops": step_flops, "skipped": int(skipped), "losses": named}
    return loss_sum, float(grad_norm), stats


def _sum_counts(per_batch) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_batch:
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


class _Window:
    """Throughput statistics since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.time = self.data = 0.0
        self.images = self.tokens = self.flops = self.skipped = self.steps = 0
        self.losses: dict[str, float] = {}

    def add(self, s: dict) -> None:
        self.time += s["time"]
        self.data += s["data"]
        self.images += s["images"]
        self.tokens += s["tokens"]
        self.flops += s["flops"]
        self.skipped += s["skipped"]
        self.steps += 1
        self.losses = s["losses"]  # the last step's, like `loss`

    def record(self, step, loss, grad_norm, scheduler, rt, peak) -> dict:
        flops = self.flops * rt.world_size  # measured on this rank; the others' batches are alike
        t = max(self.time, 1e-9)
        rec = {
            "step": step,
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_s": self.images * rt.world_size / t,
            "tokens_per_s": self.tokens * rt.world_size / t,
            "mfu": flops / t / (peak * rt.world_size),
            "data_wait_frac": self.data / t,
            "skipped_steps": self.skipped,
        } | {f"loss/{name}": value for name, value in self.losses.items()}
        self.reset()
        return rec


def _progress(cfg: Config, start: int, rt):
    if not (cfg.train.progress and rt.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _save(run: RunDir, step: int, model, optimizer, scheduler, cfg: Config, rt, data_state=None) -> None:
    if rt.is_main:
        meta = {"samples_seen": step * cfg.train.batch_size * rt.world_size}
        if data_state is not None:  # streaming sources: every rank's worker positions (data/loader.py)
            meta["data"] = data_state
        checkpoint.save(run.checkpoints, step, model, optimizer, scheduler, meta, cfg.train.keep_checkpoints)
    if rt.world_size > 1:
        torch.distributed.barrier()
