"""`graft compare RECIPE... --budget FLOPS [--seeds K] [--set KEY=VALUE ...] --out DIR`: designs at
matched training compute.

Every recipe is trained to the same training FLOPs — forward and backward of every part, vision
included, counted by torch's FLOP counter on the recipe's first batch (trainer/flops.py); a frozen
teacher's forward (EVE's tower) is not the model's and is reported beside the table — with the
same seeds (and so the same data order where the data settings agree), evaluated on the same
splits and tasks, and summarised in `DIR/report.md`: parameters, image tokens per image, FLOPs,
wall time, samples/s, MFU, and every metric as mean ± standard deviation over seeds, plus
`DIR/loss_vs_flops.png` (training loss and the first metric, evaluated 4 times along each run,
against training FLOPs). Runs live in `DIR/<recipe>-seed<k>/`; re-running reuses finished runs
and resumes an interrupted one (it is `graft train` underneath). `--set` applies to every recipe.

An arm may differ from a recipe by settings alone (objectives, teachers, weights): `--arm
"NAME=RECIPE KEY=VALUE ..."` trains RECIPE with those `--set` keys (after the common ones) as the
row NAME, in `DIR/NAME-seed<k>/`; a recipe given by name is the arm of that name with no settings.

A recipe that starts from another recipe's run (`recipes.STAGES`: BLIP-2 stage 2 from a stage-1
Q-Former, LLaVA stage 2 from stage 1) gets it trained once per seed in `DIR/stages/`, however
many recipes share it, with its own recipe's steps (and the `--set` keys of the sections it
reads); its compute is reported beside the budget, not inside it.

With no recipe, the default comparison: `DEFAULT_RECIPES` at `DEFAULT_BUDGET` (docs/compare.md).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft import atomic
from graft.build import assemble, build_processor, build_stream, resolve, step_losses, tokenizer_for
from graft.config_checks import apply_overrides
from graft.designs import SHARED_SECTIONS, design
from graft.errors import UserError
from graft.recipes import RECIPES, STAGES, recipe
from graft.report import png_bytes, pyplot
from graft.trainer.flops import MeasuredFlops, count_step
from graft.trainer.loop import train
from graft.trainer.metrics import read
from graft.trainer.runtime import Runtime

EVAL_POINTS = 4  # evaluations per run (the last at the end), for the metric-vs-FLOPs plot
# Every connector design on the default recipe's world, model and data order (docs/compare.md).
DEFAULT_RECIPES = ("shapes_linear", "shapes_vqa", "shapes_pixel_shuffle", "shapes_avgpool", "shapes_resampler",
                   "shapes_qformer")
DEFAULT_BUDGET = 6e12  # training FLOPs per run (~215 steps of shapes_vqa): 3 seeds of all six in ≤ 30 CPU minutes


@dataclass(frozen=True)
class Arm:
    """One row of the comparison: `recipe` trained with its own `sets` after the common overrides."""

    name: str
    recipe: str
    sets: tuple[str, ...] = field(default=())


def parse_arm(spec: str) -> Arm:
    """`NAME=RECIPE KEY=VALUE ...` (shell-quoted words) → an Arm; NAME names its run folders."""
    try:
        words = shlex.split(spec)
    except ValueError as e:
        raise UserError(f"--arm {spec!r}: {e}") from None
    name, sep, recipe_name = words[0].partition("=") if words else ("", "", "")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not recipe_name:
        raise UserError(f"--arm {spec!r} is not NAME=RECIPE [KEY=VALUE ...] (NAME: letters, digits, _ . -)")
    return Arm(name, recipe_name, tuple(words[1:]))


def compare(arms: list[Arm | str], budget: float | None, seeds: int, overrides: list[str], out: Path) -> Path:
    arms = [Arm(a, a) if isinstance(a, str) else a for a in arms] or [Arm(r, r) for r in DEFAULT_RECIPES]
    budget = DEFAULT_BUDGET if budget is None else budget
    if seeds < 1:
        raise UserError(f"--seeds={seeds} must be at least 1")
    if len({a.name for a in arms}) < len(arms):
        raise UserError(f"two arms share a name: {', '.join(a.name for a in arms)}")
    plans = [(arm, recipe(arm.recipe, [*overrides, *arm.sets])) for arm in arms]  # every arm checked first
    stages = _Stages(overrides, seeds, out / "stages")
    rows = []
    for arm, cfg in plans:
        per_seed = [stages.apply(arm, cfg, seed) for seed in range(seeds)]  # trains a shared stage once
        info = measure(per_seed[0])
        steps = int(budget // info["flops_per_step"])
        if steps < 1:
            raise UserError(f"--budget {budget:.3g} is smaller than one step of {arm.name} ({info['flops_per_step']:.3g} FLOPs)")
        runs = [_run(c, steps, seed, out / f"{arm.name}-seed{seed}") for seed, c in enumerate(per_seed)]
        rows.append({"recipe": arm.name, "from": arm.recipe, "settings": list(arm.sets), "steps": steps, **info,
                     "runs": runs, "stage": stages.used_by(arm.name)})
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "compare.json", json.dumps({"rows": rows, "stages": stages.summary()}, indent=1))
    _plot(rows, out / "loss_vs_flops.png")
    path = out / "report.md"
    atomic.write_text(path, _report(rows, stages.summary(), budget, seeds, overrides))
    return path


class _Stages:
    """The runs that recipes start from (`recipes.STAGES`), trained once per seed and shared."""

    def __init__(self, overrides: list[str], seeds: int, root: Path):
        self.overrides, self.seeds, self.root = overrides, seeds, root
        self.done: dict[str, dict] = {}  # stage recipe → {"runs": [...], "flops_per_step", "steps"}
        self.users: dict[str, str] = {}  # recipe → its stage recipe

    def apply(self, arm: Arm, cfg, seed: int):
        """`cfg` with its stage key pointing at the stage run of `seed` (trained now if missing)."""
        if arm.recipe not in STAGES:
            return cfg
        key, stage = STAGES[arm.recipe]
        self.users[arm.name] = stage
        if stage not in self.done:
            self.done[stage] = self._train(stage)
        return apply_overrides(copy.deepcopy(cfg), [f"{key}={self.done[stage]['runs'][seed]['run']}"])

    def used_by(self, name: str) -> str | None:
        return self.users.get(name)

    def summary(self) -> dict:
        return {stage: {**info, "used_by": [r for r, s in self.users.items() if s == stage]}
                for stage, info in self.done.items()}

    def _train(self, stage: str) -> dict:
        reads = set(design(RECIPES[stage]().model).sections) | set(SHARED_SECTIONS)
        cfg = recipe(stage, [o for o in self.overrides if o.partition("=")[0].split(".")[0] in reads])
        info = measure(cfg)
        runs = []
        for seed in range(self.seeds):
            run = self.root / f"{stage}-seed{seed}"
            runs.append({"run": str(run), **_run(cfg, cfg.train.steps, seed, run, eval_points=1)})
        return {"steps": cfg.train.steps, "flops_per_step": info["flops_per_step"], "runs": runs}


def first_batches(cfg):
    """The assembled model of `cfg` (without moving the global RNG), its processor, and the
    micro-batches of its first step."""
    tok = tokenizer_for(cfg)
    resolved, _ = resolve(cfg, tok)
    with torch.random.fork_rng():
        model = assemble(resolved, tok)
    proc = build_processor(resolved, tok, model)
    stream = build_stream(resolved, proc, Runtime(torch.device("cpu"), torch.float32))
    batches = [stream.batch(0, m) for m in range(resolved.train.grad_accum)]
    stream.close()
    return model, proc, batches


def measure(cfg) -> dict:
    """Training FLOPs of one step (the first batch), a frozen teacher's forward FLOPs apart,
    parameters, image features the LM reads per image."""
    model, proc, batches = first_batches(cfg)
    losses = step_losses(cfg, model, proc.tok)  # the budget counts the model trained, not a frozen teacher
    return {"flops_per_step": float(sum(count_step(model, b, losses) for b in batches)),
            "teacher_flops_per_step": float(MeasuredFlops().teacher(losses, batches)),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "image_tokens": getattr(model, "tokens_per_image", None)}


def _run(cfg, steps: int, seed: int, run: Path, eval_points: int = EVAL_POINTS) -> dict:
    """Train one seed to `steps` (or reuse it); its metrics, wall time and last throughput."""
    done = run / "compare_run.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = copy.deepcopy(cfg)
    cfg.train.steps, cfg.train.seed, cfg.train.ckpt_every = steps, seed, min(cfg.train.ckpt_every, steps)
    cfg.train.eval_every = max(1, steps // eval_points)  # metric-vs-FLOPs points along the run
    cfg.train.log_every = max(1, min(cfg.train.log_every, steps // 20))  # a loss curve even for short runs
    start = time.perf_counter()
    results = train(cfg, run)
    last = [r for r in read(run) if "mfu" in r][-1]
    entry = {"seed": seed, "metrics": results, "wall_s": time.perf_counter() - start,
             "samples_per_s": last["samples_per_s"], "mfu": last["mfu"]}
    atomic.write_text(done, json.dumps(entry))
    return entry


def _mean_sd(values: list[float], fmt: str = ".3f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def _report(rows: list[dict], stages: dict, budget: float, seeds: int, overrides: list[str]) -> str:
    metrics = list(dict.fromkeys(k for row in rows for run in row["runs"] for k in run["metrics"]))
    head = ["recipe", "params (trainable)", "image tokens", "FLOPs/step", "steps", "wall s", "samples/s", "MFU"]
    lines = [f"# graft compare: {len(rows)} designs at {budget:.3g} training FLOPs, {seeds} seed(s)", "",
             "Overrides: " + (" ".join(f"`{o}`" for o in overrides) or "none") + ".", "",
             *[f"Arm `{row['recipe']}`: `{row['from']}` with " + " ".join(f"`{s}`" for s in row["settings"]) + "."
               for row in rows if row.get("settings")], "",
             "| " + " | ".join(head + metrics) + " |", "|---" * (len(head) + len(metrics)) + "|"]
    for row in rows:
        runs = row["runs"]
        cells = [row["recipe"], f"{row['params']:,} ({row['trainable']:,})", str(row["image_tokens"]),
                 f"{row['flops_per_step']:.3g}", str(row["steps"]), _mean_sd([r["wall_s"] for r in runs], ".1f"),
                 _mean_sd([r["samples_per_s"] for r in runs], ".0f"), _mean_sd([r["mfu"] for r in runs])]
        cells += [_mean_sd([r["metrics"][m] for r in runs if m in r["metrics"]]) if any(m in r["metrics"] for r in runs)
                  else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    for stage, info in stages.items():
        users, runs = info["used_by"], info["runs"]
        scores = ", ".join(f"{k} {_mean_sd([r['metrics'][k] for r in runs])}" for k in list(runs[0]["metrics"])[:3])
        lines += ["", f"{', '.join(users)} start{'s' if len(users) == 1 else ''} from `{stage}`, trained once per "
                  f"seed for {info['steps']} steps ({info['steps'] * info['flops_per_step']:.3g} training FLOPs, "
                  f"not in the budget) in `stages/`: {scores}."]
    for row in rows:
        if row.get("teacher_flops_per_step"):
            lines += ["", f"{row['recipe']} learns from a frozen teacher whose forward adds "
                      f"{row['teacher_flops_per_step']:.3g} FLOPs per step, not in the budget (FLOPs/step counts "
                      "the model trained)."]
    return "\n".join(lines + ["", "![training loss and the first metric against training FLOPs](loss_vs_flops.png)", ""])


def _plot(rows: list[dict], path: Path) -> None:
    fig, (loss_ax, metric_ax) = pyplot().subplots(1, 2, figsize=(11, 3.5))
    metric = next(iter(rows[0]["runs"][0]["metrics"]), None)
    for row in rows:
        records = read(path.parent / f"{row['recipe']}-seed0")
        train = [r for r in records if "loss" in r and r.get("event") != "eval"]
        evals = [r for r in records if r.get("event") == "eval" and metric in r]
        flops = row["flops_per_step"]
        loss_ax.plot([r["step"] * flops for r in train], [r["loss"] for r in train], label=row["recipe"])
        metric_ax.plot([r["step"] * flops for r in evals], [r[metric] for r in evals], "o-", label=row["recipe"])
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    metric_ax.set_ylabel(f"{metric} (seed 0)")
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("training FLOPs")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.write_bytes(path, png_bytes(fig, 110))
