"""`graft scale sweep RECIPE --budgets C1 C2 ... --sizes S1 S2 ... --out DIR`: the runs a scaling law
is fitted to.

For every budget C (training FLOPs, counted as `graft compare` counts them: forward and backward of
every part, vision included, on the size's first batch) and every size of the ladder (graft/ladder.py)
one run per seed is trained to exactly that budget: steps = floor(C / FLOPs per step), and
`train.steps` is what the learning-rate schedule ends at, so every run decays fully within its own
budget (a cosine cut short is the error Porian et al. 2024 traced Kaplan's exponent to). A run
shorter than `2 x optim.warmup_steps` is left out of the plan, saying so. Each run is a plain
`graft train` command (printed in the plan, written to DIR/commands.txt) with the size's shape,
its steps and seed, and `eval.heldout_batches` (the loss fitted: the training objective on the
world's unseen val split, trainer/heldout.py) — the world's own evaluation is off unless `--set
eval.splits=...` asks for it.

The plan is printed first: every run's steps, FLOPs, training tokens and an estimated time on this
machine (each size's step timed once here, at the thread count a job gets, plus a fixed start-up
cost: a rough guide, not a benchmark). Runs are then trained K at a time (`--jobs K`), each pinned
to its own share of this process's cores with as many threads, with a progress bar over the
sweep's estimated work. Re-running the command reuses finished runs (their eval.json) and resumes
an interrupted one (it is `graft train` underneath). `--launch slurm` or `--launch torchrun`
writes the runs as a Slurm array script or a torchrun launch list instead of training them here;
the same sweep command, run again once they are done, collects them.

What it writes (graft/sweep_report.py): DIR/points.csv (per run: params with and without
embeddings, training tokens and samples, measured FLOPs, held-out loss), DIR/fit/ (approach 3,
`graft scale fit` on those points, when there are at least 10) and DIR/report.md with approach 2's
isoFLOP profiles, both approaches' compute-optimal sizes side by side, and the plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from graft import atomic, sweep_report, sweep_wsd
from graft.build import build_stream, step_losses
from graft.compare import first_batches
from graft.designs import design
from graft.errors import UserError
from graft.ladder import Size, ladder
from graft.losses import weighted
from graft.recipes import recipe
from graft.trainer.flops import count_step
from graft.trainer.runtime import Runtime

# The default sweep (no recipe given): the built-in world at budgets a 2-core CPU trains in ~10 minutes
# with --jobs 2, and sizes around their compute-optimal ones (docs/scaling.md)
DEFAULT_RECIPE = "shapes_scale"
DEFAULT_BUDGETS = (3e10, 1e11, 3e11, 1e12)
DEFAULT_SIZES = ("16x1", "32x1", "48x1", "64x1", "64x2", "96x2")
HELDOUT_BATCHES = 8  # val-split steps behind each run's held-out loss
STARTUP_S = 8.0  # a run's start-up (imports, tokenizer, model) and held-out evaluation: 7 s for `tiny` (AMD EPYC)
LAUNCHERS = ("slurm", "torchrun")
SWEEP_SETS = ("eval.splits=[]", "train.progress=false")  # before the user's --set: theirs win
OWNED = ("lm.hidden_size", "lm.layers", "lm.heads", "lm.kv_heads", "lm.intermediate_size", "vision.hidden_size",
         "vision.heads", "vision.layers", "vision.intermediate_size", "train.steps", "train.seed", "eval.heldout_batches")


@dataclass(frozen=True)
class Run:
    size: Size
    budget: float
    seed: int
    steps: int
    flops_per_step: float
    tokens_per_step: int
    samples_per_step: int
    est_s: float
    parent: str | None = None  # optim.schedule=wsd: the longer run this one branches from (graft/sweep_wsd.py)
    start: int = 0  # ... at this step of it
    keep: tuple[int, ...] = ()  # the steps whose checkpoints its branches start from

    @property
    def name(self) -> str:
        return f"{self.size.name}-C{self.budget:.2e}-seed{self.seed}".replace("+", "")

    def sets(self, overrides: list[str]) -> list[str]:
        every = f"train.ckpt_every={max(1, self.steps // 4)}"  # resumable, without a checkpoint every few steps
        keep = [f"train.keep_steps=[{','.join(map(str, self.keep))}]"] if self.keep else []
        return [*SWEEP_SETS, every, *overrides, *self.size.sets, f"train.steps={self.steps}", f"train.seed={self.seed}",
                f"eval.heldout_batches={HELDOUT_BATCHES}", *keep]

    def command(self, recipe_name: str, out: Path, overrides: list[str], launcher: list[str]) -> list[str]:
        sets = [word for s in self.sets(overrides) for word in ("--set", s)]
        return [*launcher, "train", recipe_name, "--out", str(out / "runs" / self.name), *sets]


@dataclass(frozen=True)
class Plan:
    recipe: str
    runs: list[Run]
    left_out: list[str]  # why a (size, budget) has no run
    jobs: int


def plan(recipe_name: str, budgets: list[float], specs: list[str], seeds: int, overrides: list[str],
         jobs: int = 1) -> Plan:
    if seeds < 1 or jobs < 1:
        raise UserError(f"--seeds={seeds} and --jobs={jobs} must be at least 1")
    if jobs > len(os.sched_getaffinity(0)):
        raise UserError(f"--jobs={jobs}: this process may run on {len(os.sched_getaffinity(0))} cores, one job per core at most")
    if not budgets or any(c <= 0 for c in budgets):
        raise UserError(f"--budgets {budgets}: give positive training FLOPs, e.g. --budgets 1e12 2e12 4e12")
    owned = sorted({o.partition("=")[0] for o in overrides} & set(OWNED))
    if owned:
        raise UserError(f"--set {', '.join(owned)}: the sweep sets it per run (--sizes, --budgets, --seeds)")
    cfg = recipe(recipe_name, overrides)
    sizes = ladder(cfg, specs)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    runs, left_out = [], []
    for size in sizes:
        sized = recipe(recipe_name, [*SWEEP_SETS, *overrides, *size.sets])
        fps, tokens, samples, step_s = _measure(sized, threads)
        for budget in sorted(budgets):
            steps = int(budget // fps)
            if steps < 2 * sized.optim.warmup_steps:
                left_out.append(f"{size.name} at C={budget:.3g}: {steps} steps of {fps:.3g} FLOPs, under 2 x "
                                f"optim.warmup_steps={sized.optim.warmup_steps}")
                continue
            runs += [Run(size, budget, seed, steps, fps, tokens, samples, STARTUP_S + steps * step_s)
                     for seed in range(seeds)]
    if not runs:
        raise UserError("graft scale sweep: no run is long enough; raise --budgets or lower --sizes ("
                        + "; ".join(left_out) + ")")
    if cfg.optim.schedule == "wsd":  # one run per size and seed, the shorter budgets decayed from its checkpoints
        runs = sweep_wsd.link(runs, cfg.optim.warmup_steps, cfg.optim.decay_fraction, STARTUP_S)
    return Plan(recipe_name, runs, left_out, jobs)


def _measure(cfg, threads: int) -> tuple[float, int, int, float]:
    """FLOPs, LM tokens and samples of one step (its first batches), and its time at `threads`
    threads: making the next step's batches, then forward and backward."""
    model, proc, batches = first_batches(cfg)
    start = time.perf_counter()
    stream = build_stream(cfg, proc, Runtime(torch.device("cpu"), torch.float32))
    for micro in range(cfg.train.grad_accum):
        stream.batch(1, micro)
    stream.close()
    data_s = time.perf_counter() - start
    losses = step_losses(cfg, model, proc.tok)
    fps = float(sum(count_step(model, b, losses) for b in batches))
    entry = design(cfg.model)
    tokens = sum(int(entry.tokens(b, proc.tok.pad)) for b in batches)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(3):  # the first warms the allocator up; the median of the other two
            start = time.perf_counter()
            for b in batches:
                named = losses.losses(model, b)
                weighted(named, losses.counts(b)).backward()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return fps, tokens, cfg.train.batch_size, data_s + sorted(times[1:])[0]


def launcher_words() -> list[str]:
    return [sys.executable, "-m", "graft"]


def render(p: Plan, out: Path, overrides: list[str], done: set[str]) -> str:
    lines = [f"graft scale sweep {p.recipe}: {len(p.runs)} runs ({len(done)} already done) in {out}",
             f"{'run':34s} {'params':>10s} {'steps':>6s} {'FLOPs':>9s} {'tokens':>9s} {'est. s':>7s}"]
    for r in p.runs:
        mark = (f" (decays from step {r.start} of {r.parent})" if r.parent else "") + (" (done)" if r.name in done else "")
        lines.append(f"{r.name:34s} {r.size.params:>10,} {r.steps:>6d} {r.steps * r.flops_per_step:>9.3g} "
                     f"{r.steps * r.tokens_per_step:>9.3g} {r.est_s:>7.0f}{mark}")
    todo = sum(r.est_s for r in p.runs if r.name not in done)
    lines += [f"left out: {why}" for why in p.left_out]
    lines.append(f"estimated time here: {todo / 60:.1f} min of runs" +
                 (f", ~{todo / 60 / p.jobs:.1f} min with --jobs {p.jobs}" if p.jobs > 1 else ""))
    first = p.runs[0].command(p.recipe, out, overrides, ["graft"])
    lines.append(f"each run is a command like: {shlex.join(first)}")
    return "\n".join(lines)


def finished(out: Path, runs: list[Run]) -> set[str]:
    return {r.name for r in runs if "heldout_loss" in _eval(out / "runs" / r.name)}


def _eval(run: Path) -> dict:
    try:
        return json.loads((run / "eval.json").read_text())
    except (OSError, ValueError):
        return {}


def execute(p: Plan, out: Path, overrides: list[str]) -> list[str]:
    """Train every run not done, `p.jobs` at a time on disjoint cores; the names of runs that failed."""
    done = finished(out, p.runs)
    todo = [r for r in p.runs if r.name not in done]
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // p.jobs)
    slots: queue.Queue = queue.Queue()
    for j in range(min(p.jobs, len(cores))):
        slots.put(cores[j * share:(j + 1) * share])
    (out / "logs").mkdir(parents=True, exist_ok=True)
    failed, lock = [], threading.Lock()
    bar = tqdm(total=round(sum(r.est_s for r in todo)), unit="est-s", desc="sweep", dynamic_ncols=True)

    def one(run: Run) -> None:
        if run.parent is not None:
            try:
                sweep_wsd.branch(out / "runs" / run.parent, run.start, out / "runs" / run.name)
            except FileNotFoundError as e:  # its parent failed
                with lock:
                    failed.append(run.name)
                    bar.set_postfix_str(f"{run.name} failed: {e}")
                return
        mine = slots.get()
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(len(mine)), "MKL_NUM_THREADS": str(len(mine))}
            with open(out / "logs" / f"{run.name}.log", "w") as log:
                log.write(f"graft scale sweep: cores {','.join(map(str, mine))}, OMP_NUM_THREADS={len(mine)}\n")
                log.flush()
                child = subprocess.Popen(run.command(p.recipe, out, overrides, launcher_words()), env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
                with contextlib.suppress(ProcessLookupError):  # (a child that has already exited)
                    os.sched_setaffinity(child.pid, mine)  # before torch is imported there: its threads inherit it
                rc = child.wait()
        finally:
            slots.put(mine)
        with lock:
            if rc != 0:
                failed.append(run.name)
            bar.update(round(run.est_s))
            bar.set_postfix_str(f"{run.name} {'failed' if rc else 'done'}")

    with ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
        list(pool.map(one, [r for r in todo if r.parent is None]))  # WSD branches after the runs they start from
        list(pool.map(one, [r for r in todo if r.parent is not None]))
    bar.close()
    return failed


def write_launch(p: Plan, out: Path, overrides: list[str], kind: str) -> Path:
    """DIR/commands.txt (one `graft train` per line) and the script that runs them on a cluster."""
    if kind not in LAUNCHERS:
        raise UserError(f"--launch {kind!r} is not one of {', '.join(LAUNCHERS)}")
    if any(r.parent for r in p.runs):
        raise UserError("--launch with optim.schedule=wsd: a branch starts from its parent run's checkpoint, which "
                        "these scripts do not wait for; run the sweep here, or with the cosine schedule")
    done = finished(out, p.runs)
    todo = [r for r in p.runs if r.name not in done]
    out.mkdir(parents=True, exist_ok=True)
    words = ["python", "-m", "graft"] if kind == "slurm" else \
        ["torchrun", "--standalone", "--nproc_per_node=${NPROC:-1}", "-m", "graft"]
    lines = [" ".join(shlex.quote(w) if "$" not in w else w for w in r.command(p.recipe, out, overrides, words))
             for r in todo]
    atomic.write_text(out / "commands.txt", "".join(line + "\n" for line in lines))
    if kind == "slurm":
        script = out / "sweep.sbatch"
        atomic.write_text(script, "\n".join([
            "#!/bin/bash", f"#SBATCH --job-name=graft-sweep-{p.recipe}", f"#SBATCH --array=0-{max(len(lines) - 1, 0)}",
            "#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-task=1", f"#SBATCH --output={out}/logs/%A_%a.log",
            "# one run per array task; edit the resources above for your cluster",
            f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(out / "commands.txt"))})',
            'exec bash -c "$line"', ""]))
    else:
        script = out / "sweep_torchrun.sh"
        atomic.write_text(script, "\n".join([
            "#!/bin/bash", "# each run on NPROC GPUs of this node, one after another (NPROC=8 bash sweep_torchrun.sh)",
            "set -e", *lines, ""]))
    script.chmod(0o755)
    return script


def sweep(recipe_name: str | None, budgets: list[float] | None, specs: list[str] | None, out: Path, seeds: int = 1,
          overrides: list[str] | None = None, jobs: int = 1, launch: str | None = None, plan_only: bool = False,
          samples: int = 200, command: str = "") -> Path | None:
    """Plan, print the plan, then train (or write the launch files) and report; the report's path."""
    overrides = list(overrides or [])
    if recipe_name is None:
        recipe_name, budgets, specs = DEFAULT_RECIPE, budgets or list(DEFAULT_BUDGETS), specs or list(DEFAULT_SIZES)
    elif not budgets or not specs:
        raise UserError(f"graft scale sweep {recipe_name}: give --budgets and --sizes (the defaults are "
                        f"{DEFAULT_RECIPE}'s)")
    if launch is not None and launch not in LAUNCHERS:
        raise UserError(f"--launch {launch!r} is not one of {', '.join(LAUNCHERS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    p = plan(recipe_name, budgets, specs, seeds, overrides, jobs)
    print(render(p, out, overrides, finished(out, p.runs)), flush=True)
    if plan_only:
        return None
    if launch is not None:
        script = write_launch(p, out, overrides, launch)
        print(f"wrote {out / 'commands.txt'} and {script}; run the same `graft scale sweep` again when they are done "
              "to collect them")
        return None
    failed = execute(p, out, overrides)
    path = sweep_report.write(p.runs, out, command or f"graft scale sweep {recipe_name}", samples, recipe_name, overrides)
    if failed:
        raise UserError(f"{len(failed)} of {len(p.runs)} runs failed (logs: " +
                        ", ".join(str(out / 'logs' / f'{n}.log') for n in failed[:3]) + "); the report holds the rest")
    return path
