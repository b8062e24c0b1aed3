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
from graft.config import Config
from graft.data.hf_tokenizer import HFChatTokenizer
from graft.data.sources import build_stream, training_corpus
from graft.data.tokenizer import ChatTokenizer
from graft.errors import UserError
from graft.eval.harness import entries, evaluate, unprefixed
from graft.models.lora import add_lora, merge_lora
from graft.report import write_report
from graft.rundir import RunDir, adopt_vision_arch, build_model, build_processor, load_vision, resolve_backbones
from graft.train import checkpoint, runtime
from graft.train.flops import causal_context, step_flops
from graft.train.metrics import MetricsLog
from graft.train.optim import build_optimizer, build_scheduler

# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.ckpt_every",
                     "train.keep_checkpoints", "train.eval_every", "eval.")


def train(cfg: Config, out: str | Path) -> dict:
    """Train `cfg` into run directory `out`; returns the final evaluation (and writes report.md)."""
    started = time.perf_counter()
    run = RunDir(out)
    rt = runtime.setup(cfg.train.device, cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    if cfg.vision.init_from:
        changes = adopt_vision_arch(cfg)
        if changes and rt.is_main:
            print(f"vision.init_from: took {', '.join(changes)} from {cfg.vision.init_from}", flush=True)
    cfg, tok = _prepare_run_dir(cfg, run, rt)
    model = build_model(cfg, tok)
    if cfg.train.init_from:
        _init_from(model, cfg.train.init_from)
    if cfg.vision.init_from:
        # A locked image head must be the run's too: a random projection, frozen, could not be learned around.
        load_vision(model, cfg.vision.init_from, image_head="image_head" in cfg.train.freeze)
    if cfg.lm.lora_rank:  # after init_from, so a run without adapters can initialise one with them
        add_lora(model.lm, cfg.lm)
    model.freeze(cfg.train.freeze)
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
    window = _Window()
    for step in range(start, cfg.train.steps):
        loss, grad_norm, stats = _train_step(ddp or model, model, stream, optimizer, cfg, rt, step)
        scheduler.step()
        window.add(stats)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            record = window.record(done, runtime.all_mean(loss, rt), grad_norm, scheduler, model, rt, peak)
            record |= stream.stats(rt)  # data_skipped counts by reason, summed over ranks
            log.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps:
            _save(run, done, model, optimizer, scheduler, cfg, rt, stream.state_dict(rt))
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


def _prepare_run_dir(cfg: Config, run: RunDir, rt) -> tuple[Config, ChatTokenizer]:
    """Write (or check) config.yaml and tokenizer.json; returns the resolved config and tokenizer."""
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {run.path} exists and is not a directory")
    tok = _tokenizer(cfg, run)
    cfg = resolve_backbones(cfg, tok)  # HF folders' architecture, so config.yaml says what trains
    if run.config_path.exists():
        _check_same_run(run.config(), cfg, run)
    if cfg.lm.vocab_size == 0:
        cfg.lm.vocab_size = len(tok)
    if rt.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.has_tokenizer():
            run.save_tokenizer(tok)
        config_mod.save(cfg, run.config_path)
        checkpoint.clean_partial(run.checkpoints)
    if rt.world_size > 1:
        torch.distributed.barrier()
    return cfg, tok


def _tokenizer(cfg: Config, run: RunDir):
    """The run's own; else the HF LM's; else data.tokenizer; else init_from's; else trained on the world."""
    if run.has_tokenizer():
        return run.tokenizer()
    if cfg.lm.hf_path:
        return HFChatTokenizer.load(cfg.lm.hf_path, key="lm.hf_path")
    if cfg.data.tokenizer:
        return ChatTokenizer.load(Path(cfg.data.tokenizer))
    src = Path(cfg.train.init_from) if cfg.train.init_from else None
    if src is not None and RunDir(src).has_tokenizer():
        return RunDir(src).tokenizer()
    if src is not None and (src / "tokenizer.json").is_file():  # an exported HF folder
        return ChatTokenizer.load(src / "tokenizer.json")
    return ChatTokenizer.train(training_corpus(cfg), cfg.data.vocab_size)


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


def _init_from(model, path: str) -> None:
    """Weights from a graft run (LoRA merged) or an exported HF LLaVA folder (config.json)."""
    src = RunDir(path)
    if not src.config_path.is_file() and (Path(path) / "config.json").is_file():
        from graft.models.hf_llava import load_llava_weights  # imports transformers: only when needed

        load_llava_weights(model, path)
        return
    src.require()
    ckpt = src.latest_checkpoint()
    if ckpt is None:
        raise UserError(f"train.init_from: {path} has no complete checkpoint")
    if not src.config().lm.lora_rank:
        checkpoint.load_weights(model, ckpt)
        return
    with torch.random.fork_rng():  # building the source model must not move this run's RNG
        _, _, source, _ = src.load()
    merge_lora(source.lm)  # adapters folded in: the names are those of a model without LoRA
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise UserError(f"train.init_from: {path} does not fit this model ({str(e).splitlines()[1].strip()[:160]})") from None


def _resume(run: RunDir, optimizer, scheduler, model, rt) -> int:
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return 0
    checkpoint.load_weights(model, ckpt)
    meta = checkpoint.load_train_state(ckpt, optimizer, scheduler)
    if rt.is_main:
        print(f"resuming from {ckpt} (step {meta['step']})", flush=True)
    return int(meta["step"])


def _train_step(engine, model, stream, optimizer, cfg: Config, rt, step: int):
    """One optimiser step over grad_accum micro-batches; skips the update if gradients are non-finite."""
    t0 = time.perf_counter()
    accum, data_s, loss_sum = cfg.train.grad_accum, 0.0, 0.0
    # A loss over features gathered from all ranks is already a global-batch mean; DDP averages
    # gradients over ranks once more, so scale that back (see graft/losses.py).
    grad_mult = rt.world_size if getattr(model, "global_batch_loss", False) else 1
    images = tokens = context = 0
    optimizer.zero_grad(set_to_none=True)
    for micro in range(accum):
        td = time.perf_counter()
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in stream.batch(step, micro).items()}
        data_s += time.perf_counter() - td
        sync = micro == accum - 1 or not isinstance(engine, DDP)
        with (engine.no_sync() if not sync else contextlib.nullcontext()), rt.autocast():
            _, loss = engine(**batch)
        (loss * grad_mult / accum).backward()
        loss_sum += loss.item() / accum
        images += batch["pixel_values"].shape[0]
        if "input_ids" in batch:  # CLIPPO batches carry rendered text, no token ids
            tokens += int((batch["input_ids"] != stream.proc.tok.pad).sum())
            context += causal_context(batch["input_ids"], stream.proc.tok.pad, batch.get("position_ids"))
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    skipped = not math.isfinite(float(grad_norm))  # same on every rank: grads are already all-reduced
    if skipped:
        optimizer.zero_grad(set_to_none=True)  # a non-finite update never reaches the weights
    else:
        optimizer.step()
    stats = {"time": time.perf_counter() - t0, "data": data_s, "images": images, "tokens": tokens,
             "context": context, "skipped": int(skipped)}
    return loss_sum, float(grad_norm), stats


class _Window:
    """Throughput statistics since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.time = self.data = 0.0
        self.images = self.tokens = self.context = self.skipped = self.steps = 0

    def add(self, s: dict) -> None:
        self.time += s["time"]
        self.data += s["data"]
        self.images += s["images"]
        self.tokens += s["tokens"]
        self.context += s["context"]
        self.skipped += s["skipped"]
        self.steps += 1

    def record(self, step, loss, grad_norm, scheduler, model, rt, peak) -> dict:
        flops = step_flops(model, self.images, self.tokens, self.context) * rt.world_size
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
        }
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
