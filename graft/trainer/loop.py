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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from graft import atomic
from graft import config as config_mod
from graft.build import assemble, build_processor, build_stream, resolve, step_losses, tokenizer_for
from graft.config import Config
from graft.designs import design
from graft.distill import loss_weights
from graft.errors import Stopped, UserError
from graft.eval.harness import entries, evaluate, unprefixed
from graft.eval.shard import sharded
from graft.losses import weighted
from graft.objectives import StepLosses
from graft.models import modality
from graft.models.layers import AfterStep
from graft.models.moe import expert_loads
from graft.report import write_report
from graft.rundir import RunDir
from graft.trainer import checkpoint, parallel, runtime
from graft.trainer.flops import MeasuredFlops
from graft.trainer.heldout import heldout_losses
from graft.trainer.metrics import MetricsLog
from graft.trainer.optim import build_optimizer, build_scheduler
from graft.trainer.stop import SkipGuard, StopOnSignal

# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.ckpt_every", "train.async_save",
                     "train.max_skipped_steps", "train.keep_checkpoints", "train.keep_steps", "train.eval_every", "eval.", "parallel.",
                     "optim.fused")


@dataclass
class _Session:
    """Everything a run holds while it trains."""

    cfg: Config
    rt: runtime.Runtime
    run: RunDir
    model: torch.nn.Module
    engine: torch.nn.Module  # what the forward goes through: DDP's wrapper, or the (FSDP2-sharded) model
    losses: StepLosses  # the model's losses, the design's objectives and its frozen teacher
    optimizer: torch.optim.Optimizer
    scheduler: object
    proc: object
    stream: object
    start: int
    samples_seen: int


def train(cfg: Config, out: str | Path) -> dict:
    """Train `cfg` into run directory `out`; returns the final evaluation (and writes report.md)."""
    started = time.perf_counter()
    s = _start(cfg, RunDir(out))
    log = MetricsLog(s.run.path, s.start, enabled=s.rt.is_main)
    _steps(s, log)
    data_summary = s.stream.summary(s.rt)
    s.stream.close()
    if s.rt.is_main and data_summary:
        print(data_summary, flush=True)
    results = _evaluate(s.model, s.proc, s.cfg, s.run, s.rt)
    if s.cfg.eval.heldout_batches:
        results |= {k: round(v, 5) for k, v in heldout_losses(s.cfg, s.proc, s.losses, s.engine, s.rt).items()}
    log.log({"step": s.cfg.train.steps, "event": "eval", **results})
    log.close()
    if s.rt.is_main:
        atomic.write_text(s.run.eval_path, json.dumps(results, indent=1))
        write_report(s.run.path, s.cfg.name, results, time.perf_counter() - started, unprefixed(entries(s.cfg)))
    runtime.teardown()
    return results


def _start(cfg: Config, run: RunDir) -> _Session:
    """Processes, run directory, model with its parallelism, optimizer, and the state of the latest
    checkpoint (on any number of processes), and the data stream from its position."""
    rt = runtime.setup(cfg.train.device, cfg.train.precision, cfg.parallel.timeout_s, cfg.parallel.kind == "fsdp2")
    torch.manual_seed(cfg.train.seed)
    tok = tokenizer_for(cfg, run)
    cfg, changes = resolve(cfg, tok)
    if changes and rt.is_main:
        print(f"vision.init_from: took {', '.join(changes)} from {cfg.vision.init_from}", flush=True)
    model = assemble(cfg, tok)
    model.to(rt.device)
    engine = parallel.apply(model, cfg, rt)  # DDP wrapper, or the model itself (sharded in place by FSDP2)
    losses = step_losses(cfg, model, tok).to(rt.device)  # a teacher stays outside the model and its wrapper
    _prepare_run_dir(cfg, tok, run, rt)  # after the model and its teachers: one they refuse leaves nothing written
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ckpt = run.latest_checkpoint()
    start, samples_seen = _resume(ckpt, model, optimizer, scheduler, cfg, rt)
    proc = build_processor(cfg, tok, model)
    stream = build_stream(cfg, proc, rt, ckpt if start else None)
    stream.resume(start, samples_seen)
    return _Session(cfg, rt, run, model, engine, losses, optimizer, scheduler, proc, stream, start, samples_seen)


def _steps(s: _Session, log: MetricsLog) -> None:
    """The training steps, each followed by its log line, checkpoint and evaluation when due; a
    signal saves the step and stops (Stopped), a collective that times out names the silent rank."""
    cfg, rt = s.cfg, s.rt
    peak = runtime.peak_flops(rt, cfg.train.peak_flops)
    bar = _progress(cfg, s.start, rt)
    window, flops, guard = _Window(), MeasuredFlops(), SkipGuard(cfg.train.max_skipped_steps)
    saver = checkpoint.Saver(s.run.checkpoints, cfg.train.keep_checkpoints, cfg.train.async_save, tuple(cfg.train.keep_steps))
    step = s.start
    try:
        with StopOnSignal() as stop:
            for step in range(s.start, cfg.train.steps):
                lr = s.scheduler.get_last_lr()[0]  # what this step uses: logged with it
                loss, grad_norm, stats = _train_step(s, step, flops)
                s.scheduler.step()
                s.samples_seen += cfg.train.batch_size * rt.world_size
                window.add(stats)
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    record = window.record(done, loss, grad_norm, lr, rt, peak)  # loss: global already
                    # data_skipped counts by reason and MoE expert loads, summed over ranks
                    log.log(record | s.stream.stats(rt) | expert_loads(s.model))
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                guard.update(stats["skipped"], done, s.run.latest_checkpoint)  # Diverged after too many in a row
                signum = stop.requested(rt)  # SIGINT / SIGTERM: checkpoint this step, then stop
                saver.poll()  # an asynchronous save completes once every process has written its files
                if signum or done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or done in cfg.train.keep_steps:
                    t = time.perf_counter()
                    meta = {"samples_seen": s.samples_seen, "global_batch": cfg.train.batch_size * rt.world_size,
                            "micro_batch": cfg.train.batch_size // cfg.train.grad_accum,
                            **({"data": d} if (d := s.stream.state_dict(rt)) else {})}
                    saver.save(done, s.model, s.optimizer, s.scheduler, meta)
                    window.blocked += time.perf_counter() - t  # training waits for this long
                if signum:
                    saver.wait()
                    _stop(signum, done, cfg, s.run, (bar, s.stream, log))
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                    log.log({"step": done, "event": "eval", **_evaluate(s.model, s.proc, cfg, s.run, rt)})
    except RuntimeError as e:  # a collective that timed out: name it and the silent rank
        raise runtime.hung(e, rt, step) or e
    saver.wait()
    if bar is not None:
        bar.close()


def _evaluate(model, proc, cfg: Config, run: RunDir, rt) -> dict:
    """Every process evaluates its share of the examples with the whole weights; process 0 writes
    the predictions. The figures equal one process's evaluation (eval/shard.py)."""
    with parallel.gathered(model), sharded(rt.rank, rt.world_size):
        return evaluate(model, proc, cfg, out=run.path if rt.is_main else None)


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
        _check_same_run(run.config(), cfg, run, rt)
    if rt.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.has_tokenizer():
            run.save_tokenizer(tok)
        config_mod.save(cfg, run.config_path)
        checkpoint.clean_partial(run.checkpoints)
    if rt.world_size > 1:
        torch.distributed.barrier()


def _check_same_run(old: Config, new: Config, run: RunDir, rt) -> None:
    """The settings of `new` are those `run` was trained with, but for the resumable ones, and the
    per-process batch and accumulation when the global batch stays what the run's latest
    checkpoint was trained with (resuming on another number of processes)."""
    a, b = _flat(config_mod.to_dict(old)), _flat(config_mod.to_dict(new))
    if b.get("lm.vocab_size") == 0:
        b["lm.vocab_size"] = a.get("lm.vocab_size")
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES):
            if key in ("train.batch_size", "train.grad_accum") and _saved_global_batch(run, old) == (
                    new.train.batch_size * rt.world_size):
                continue
            raise UserError(
                f"{run.path} holds a run with {key}={a.get(key)!r}, not {b.get(key)!r}; "
                "use another --out, or the same settings to resume"
            )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _saved_global_batch(run: RunDir, cfg: Config) -> int | None:
    """The global batch of the run's newest checkpoint (the one resuming reads; damaged ones are
    reported there, not here), or None without one."""
    for ckpt in reversed(checkpoint.complete_checkpoints(run.checkpoints)):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return _global_batch(checkpoint.read_meta(ckpt), cfg)
    return None


def _global_batch(meta: dict, cfg: Config) -> int:
    """The global batch a checkpoint was trained with (before meta.json recorded it: the per-process
    batch of `cfg`, the run's config, times the processes that saved it)."""
    return int(meta.get("global_batch", cfg.train.batch_size * int(meta.get("world_size", 1))))


def _resume(ckpt, model, optimizer, scheduler, cfg: Config, rt) -> tuple[int, int]:
    """Step and samples seen after restoring `ckpt` (model, optimizer, schedule, RNG), on any number
    of processes; (0, 0) for a new run."""
    if ckpt is None:
        return 0, 0
    meta = checkpoint.load_train_state(ckpt, model, optimizer, scheduler)
    step, saved_world = int(meta["step"]), int(meta.get("world_size", rt.world_size))
    samples = int(meta.get("samples_seen", step * cfg.train.batch_size * saved_world))
    if rt.is_main:
        print(f"resuming from {ckpt} (step {step})", flush=True)
        if saved_world != rt.world_size:
            print(f"graft: saved on {saved_world} processes, resumed on {rt.world_size}: "
                  f"{_batch_change(meta, cfg, rt.world_size)}; model and optimizer state resharded; "
                  f"training continues after sample {samples}", flush=True)
    return step, samples


def _batch_change(meta: dict, cfg: Config, world: int) -> str:
    """What a resume on `world` processes does to the global batch, and how to keep it if it changes."""
    was, now, t = _global_batch(meta, cfg), cfg.train.batch_size * world, cfg.train
    if now == was:
        return (f"the same global batch of {now} samples ({t.batch_size} per process in {t.grad_accum} "
                f"micro-batch{'es' * (t.grad_accum > 1)})")
    said = f"the global batch is now {now} samples (was {was})"
    micro = int(meta.get("micro_batch", t.batch_size // t.grad_accum))
    if was % world or (was // world) % micro:
        return said
    return f"{said}; to keep it: --set train.batch_size={was // world} --set train.grad_accum={was // world // micro}"


def _vary(batch: dict) -> None:
    """Tells torch.compile which sizes change from one micro-batch to the next, so that it compiles
    one graph for all of them, not a fixed-size one first and a general one at the next size (a
    quarter of a cold compile of `tiny` on CPU): the rows and lengths of the text tensors (packing,
    padding to the longest row) and the number of images; an image's channels and pixels stay fixed."""
    for t in batch.values():
        for dim in range(1 if t.is_floating_point() else t.dim()):
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _train_step(s: _Session, step: int, flops: MeasuredFlops):
    """One optimiser step over grad_accum micro-batches; skips the update if gradients are non-finite.

    Each named loss (the model's own and the design's objectives, graft/objectives.py) is a local
    sum; it is divided by what it counts over every micro-batch and process, weighted by
    `train.objectives`, and multiplied by the world size (DDP averages gradients over ranks), so
    that the gradient is the global batch's. Returns the weighted loss, the gradient norm, and
    statistics with `loss/<name>`; a frozen teacher's FLOPs are counted apart from the model's."""
    t0 = time.perf_counter()
    cfg, rt, model, engine, composed, stream, optimizer = s.cfg, s.rt, s.model, s.engine, s.losses, s.stream, s.optimizer
    accum, entry = cfg.train.grad_accum, design(cfg.model)
    batches = [{k: v.to(rt.device, non_blocking=True) for k, v in stream.batch(step, micro).items()}
               for micro in range(accum)]
    if cfg.parallel.compile:
        for batch in batches:
            _vary(batch)
    data_s = time.perf_counter() - t0
    counts = runtime.all_sum(_sum_counts(composed.counts(b) for b in batches), rt)
    weights = loss_weights(cfg, counts)  # train.objectives, and distill.lambda's soft/hard mix
    sums = dict.fromkeys(counts, 0.0)
    tc = time.perf_counter()
    step_flops = flops.step(model, batches, parallel.is_sharded(model), composed)  # once per new shape, then cached
    teacher_flops = flops.teacher(composed, batches)
    counting = time.perf_counter() - tc  # not training time: left out of the step's time
    images = tokens = 0
    optimizer.zero_grad(set_to_none=True)
    for micro, batch in enumerate(batches):
        with parallel.gradient_sync(engine, micro == accum - 1), rt.autocast():
            losses = composed.losses(engine, batch)
        objective = weighted(losses, counts, weights)
        (objective * rt.world_size).backward()
        for name, value in losses.items():
            sums[name] += value.item()
        images += modality.items(batch)
        tokens += entry.tokens(batch, stream.proc.tok.pad)
    named = {name: total / max(counts[name], 1) for name, total in runtime.all_sum(sums, rt).items()}
    loss_sum = sum(weights[name] * named[name] for name in weights)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip
    grad_norm = parallel.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    skipped = not math.isfinite(grad_norm)  # same on every rank: grads are already reduced
    if skipped:
        optimizer.zero_grad(set_to_none=True)  # a non-finite update never reaches the weights
    else:
        optimizer.step()
    for module in model.modules():  # state kept outside the gradients (MoE balancing biases), on every process
        if isinstance(module, AfterStep):
            module.after_step()
    stats = {"time": time.perf_counter() - t0 - counting, "data": data_s, "images": images, "tokens": tokens,
             "flops": step_flops, "teacher_flops": teacher_flops, "skipped": int(skipped), "losses": named}
    return loss_sum, grad_norm, stats


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
        self.time = self.data = self.blocked = 0.0  # blocked: waiting for checkpoint saves
        self.images = self.tokens = self.flops = self.teacher_flops = self.skipped = self.steps = 0
        self.losses: dict[str, float] = {}

    def add(self, s: dict) -> None:
        self.time += s["time"]
        self.data += s["data"]
        self.images += s["images"]
        self.tokens += s["tokens"]
        self.flops += s["flops"]
        self.teacher_flops += s["teacher_flops"]
        self.skipped += s["skipped"]
        self.steps += 1
        self.losses = s["losses"]  # the last step's, like `loss`

    def record(self, step, loss, grad_norm, lr, rt, peak) -> dict:
        flops = self.flops * rt.world_size  # measured on this rank; the others' batches are alike
        t = max(self.time, 1e-9)
        rec = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": self.images * rt.world_size / t,
            "tokens_per_s": self.tokens * rt.world_size / t,
            "mfu": flops / t / (peak * rt.world_size),  # the model's training FLOPs, not a teacher's
            "data_wait_frac": self.data / t,
            "skipped_steps": self.skipped,
            "ckpt_blocked_s": self.blocked,  # since the previous record (not in the step times above)
            "peak_mem_gb": runtime.peak_memory(rt) / 2**30,  # process 0's
        } | {f"loss/{name}": value for name, value in self.losses.items()}
        if self.teacher_flops:  # a frozen teacher's forward (graft/objectives.py), apart from the model's
            rec["teacher_flops_per_s"] = self.teacher_flops * rt.world_size / t
        self.reset()
        return rec


def _progress(cfg: Config, start: int, rt):
    if not (cfg.train.progress and rt.is_main):
        return None

    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
