"""The `graft` command: train | eval | generate | serve | export | demo | data | scale | recipes.

User errors (bad keys, values, files) print one line and exit with code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from graft import atomic
from graft.cli_data import add_data_parser, recipe_of as _recipe
from graft.errors import RunFailed, Stopped, UserError

# Each command imports what it runs inside its function, so that `graft --help` stays quick (no torch).


def cmd_train(args) -> None:
    if args.gpus is not None and not args.dry_run:
        raise UserError("graft train: --gpus goes with --dry-run (a run's world size is torchrun's WORLD_SIZE)")
    cfg = _recipe(args.recipe, args.set)
    if args.dry_run:  # the plan only: nothing written, no weights made (graft/plan.py)
        from graft.plan import dry_run

        print(dry_run(cfg, args.recipe, args.out, args.gpus).render())
        return
    from graft.eval.harness import entries, unprefixed
    from graft.trainer.loop import train

    out = args.out or f"runs/{cfg.name}"
    results = train(cfg, out)
    _print_results(results, unprefixed(entries(cfg)))
    print(f"\nrun directory: {out}   report: {Path(out) / 'report.md'}")


def cmd_eval(args) -> None:
    """The run's own evaluations (eval.splits, eval.tasks), one split (--split), or a task on
    one or more data sets (--task NAME --data PATH [--data PATH2])."""
    from graft.eval.harness import entries, evaluate, unprefixed
    from graft.build import build_processor, load_run
    from graft.rundir import RunDir

    if bool(args.task) != bool(args.data):
        raise UserError("graft eval: --task and --data go together (e.g. --task zeroshot --data DIR)")
    if args.split and args.task:
        raise UserError("graft eval: --split is the built-in world's; use --task shapes --data SPLIT beside other data")
    bad = [item for item in args.set if not item.startswith("eval.")]
    if bad:
        raise UserError(f"graft eval --set takes eval.* keys only, got '{bad[0]}'")
    run = RunDir(args.dir)
    cfg, tok, model, ckpt = load_run(run)
    if args.task:
        from graft.data.sources import source_kind
        from graft.eval.tasks import check_task

        task = check_task(args.task, cfg.model, f"--task {args.task}", source_kind(cfg).modality.name)
        for data in args.data:
            if not task.exists(data):
                raise UserError(f"--data {data}: not found (for --task {args.task})")
    if args.split or args.task:  # only what is asked: the run's own splits and tasks are not validated or run
        cfg.eval.splits, cfg.eval.tasks = ([args.split], []) if args.split else ([], [f"{args.task}={d}" for d in args.data])
    if args.set or args.split or args.task:
        from graft.config_checks import apply_overrides

        apply_overrides(cfg, args.set)  # validates: names a bad split, task, key or file in one line
    todo = entries(cfg)
    results = evaluate(model, build_processor(cfg, tok, model), cfg, todo, out=run.path)
    atomic.write_text(run.eval_path, json.dumps(results, indent=1))
    print(f"evaluated {ckpt}; predictions in {run.path}/eval_*.jsonl")
    _print_results(results, unprefixed(todo))


def cmd_generate(args) -> None:
    from graft.api import load
    from graft.data.processor import load_image
    from graft.data.samples import BadSample

    if (args.image is None) == (args.series is None):
        raise UserError("graft generate takes one of --image FILE or --series FILE")
    if args.series is not None:
        from graft.data.series_arrays import load_series_file

        item = load_series_file(args.series)
        run = load(args.dir)
        run.require_series("graft generate --series")
    else:
        item = load_image(args.image)
        run = load(args.dir)  # "<image>" typed in the prompt is plain text, never a placeholder
        run.require_images("graft generate --image")
    try:
        print(run.generate(item, args.prompt, args.max_new_tokens))
    except BadSample as e:  # e.g. a chat template that rewrites a prompt holding a control-token string
        raise UserError(f"--prompt cannot be encoded: {e}") from None


def cmd_serve(args) -> None:
    from graft.api import load
    from graft.serve import serve

    run = load(args.dir)
    run.require_images("graft serve")
    serve(run, args.host, args.port)


def cmd_export(args) -> None:
    from graft.export import export

    out = export(args.dir, args.out, args.format)
    print(f"exported {args.dir} to {out} (load with transformers.AutoModelForImageTextToText / AutoProcessor)")


def cmd_demo(args) -> None:
    from graft.recipes import DEMO
    from graft.trainer.loop import train

    out = Path(args.out)
    cfg = _recipe(DEMO, args.set)
    print(f"graft demo: training '{cfg.name}' on the built-in Shapes world into {out}", flush=True)
    results = train(cfg, out)  # writes report.md and loss.png, as every `graft train` does
    _print_results(results)
    print(f"\nrun directory: {out}   report: {out / 'report.md'}")


def cmd_compare(args) -> None:
    from graft.compare import compare, parse_arm

    path = compare([*args.recipes, *map(parse_arm, args.arm)], args.budget, args.seeds, args.set, Path(args.out))
    print(path.read_text())
    print(f"report: {path}")


def cmd_distill_precompute(args) -> None:
    """The teachers of RECIPE (with --set) over the records its run reads in train.steps steps, saved by record."""
    from graft.build import build_stream, processor_for, resolve
    from graft.designs import design
    from graft.teacher_store import precompute
    from graft.trainer import runtime

    cfg = _recipe(args.recipe, args.set)
    if not cfg.distill.teachers:
        raise UserError("graft distill precompute: the run has no distill.teachers (--set 'distill.teachers=[RUN]')")
    if cfg.distill.precomputed:
        raise UserError("graft distill precompute: distill.precomputed names what this command writes (--out); leave it out")
    proc = processor_for(cfg)
    cfg, _ = resolve(cfg, proc.tok)
    rt = runtime.setup(cfg.train.device, cfg.train.precision)  # one process: no group
    teacher = design(cfg.model).teacher(cfg, None, proc.tok).to(rt.device)
    stream = build_stream(cfg, proc, rt)
    try:
        with rt.autocast():
            m = precompute(cfg, Path(args.out), teacher, stream)
    finally:
        stream.close()
    size = sum(f.stat().st_size for f in Path(args.out).iterdir()) / 2**20
    print(f"wrote the outputs of {len(m['teachers'])} teacher(s) for {m['records']} records ({m['steps']} steps) "
          f"to {args.out}: {size:.2f} MiB, {m['seconds']} s")
    print(f"train with them: --set distill.precomputed={args.out} (and the same settings)")


def cmd_scale_fit(args) -> None:
    from graft.scale import fit_command

    s = fit_command(Path(args.points), Path(args.out), args.drop_highest, args.bootstrap, args.flops)
    c, f = s["constants"], s["frontier"]
    print("graft scale fit: L(N, D) = E + A/N^alpha + B/D^beta on "
          f"{s['fit']['points']} points (objective {s['fit']['objective']:.7f})")
    for name, v in c.items():
        print(f"  {name:6s} {v['value']:.4g} ± {v['se']:.2g}  (95 %: {v['ci95'][0]:.4g} – {v['ci95'][1]:.4g})")
    _print_frontier(f)
    print(f"wrote {Path(args.out) / 'fit.json'} and {Path(args.out) / 'report.md'}")


def cmd_scale_sweep(args) -> None:
    from graft.sweep import sweep

    path = sweep(args.recipe, args.budgets, args.sizes, Path(args.out), args.seeds, args.set, args.jobs, args.launch,
                 args.plan, args.bootstrap, shlex.join(["graft", "scale", "sweep", *sys.argv[3:]]))
    if path is not None:
        print(path.read_text())
        print(f"report: {path}")


def cmd_scale_predict(args) -> None:
    folder = Path(args.dir)
    if (args.seeds != 1 or args.jobs != 1) and not args.train:
        raise UserError("graft scale predict: --seeds and --jobs go with --train (the runs it trains)")
    if not (folder / "sweep.json").is_file():  # a `graft scale fit` folder
        from graft.scale import predict

        if args.train:
            raise UserError(f"--train needs a sweep folder (graft scale sweep --out DIR); {folder} holds none")
        _print_frontier(predict(folder, args.flops))
        return
    from graft.sweep_predict import predict as predict_sweep, train_and_check

    p = train_and_check(folder, args.flops, args.seeds, args.jobs) if args.train else \
        predict_sweep(folder, args.flops)["prediction"]
    two = p["N_opt_approach2"]
    print(f"compute-optimal at C = {p['flops']:.3g} FLOPs (measured, as the sweep's):")
    print(f"  N_opt           {p['N_opt']:.4g}  (95 %: {p['N_opt_ci95'][0]:.4g} – {p['N_opt_ci95'][1]:.4g}); approach 2: "
          + (f"{two:.4g}" if two else "none (under two bracketed profiles)"))
    print(f"  nearest size    {p['size']} ({p['params']:,} parameters), {p['steps']} steps, {p['tokens']:.3g} tokens")
    print(f"  held-out loss   {p['loss']:.4f}  (95 %: {p['loss_ci95'][0]:.4f} – {p['loss_ci95'][1]:.4f})")
    print(f"  train it:       {p['command']}")
    if args.train:
        spread = f" ± {p['observed_sd']:.4f} (sd over seeds)" if p["observed_sd"] is not None else ""
        print(f"  trained         {p['observed_mean']:.4f}{spread} over {len(p['observed'])} seed(s): "
              f"absolute relative error {100 * p['abs_rel_error']:.2f} %")


def _print_frontier(f: dict) -> None:
    print(f"compute-optimal at C = {f['flops']:.3g} FLOPs:")
    for key in ("N_opt", "D_opt", "tokens_per_param", "loss"):
        v = f[key]
        print(f"  {key:16s} {v['value']:.4g}  (95 %: {v['ci95'][0]:.4g} – {v['ci95'][1]:.4g})")


def cmd_recipes(args) -> None:
    from graft.recipes import RECIPES

    if args.show:
        from graft.config import to_dict

        print(yaml.safe_dump(to_dict(_recipe(args.show, args.set)), sort_keys=False), end="")
        return
    if args.set:
        raise UserError("graft recipes: --set needs --show NAME")
    width = max(map(len, RECIPES)) + 2
    for name, fn in RECIPES.items():
        print(f"{name:{width}s}{(fn.__doc__ or '').strip().splitlines()[0]}")


def _print_results(results: dict, first: str = "test") -> None:
    from graft.report import results_table

    print(results_table(results, first) if results else
          "no evaluation: eval.splits and eval.tasks are empty (e.g. --set 'eval.tasks=[\"zeroshot=DIR\"]')")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Add vision to language models and train them.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe (re-run to resume)")
    t.add_argument("recipe")
    t.add_argument("--out", help="run directory (default runs/RECIPE)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--dry-run", action="store_true", help="validate, count parameters and print the memory per "
                   "GPU (graft/plan.py); writes nothing")
    t.add_argument("--gpus", type=int, metavar="N",
                   help="with --dry-run: plan for N GPU processes (default: WORLD_SIZE, else 1)")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run; writes DIR/eval.json")
    e.add_argument("dir")
    e.add_argument("--split", help="one split (test, val, compositional, train, restyled); default: the config's")
    e.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an eval key, e.g. eval.zeroshot_file=prompts.yaml")
    e.add_argument("--task", help="a task on your own data (with --data): zeroshot | retrieval | caption | vqa; "
                   "shapes (--data SPLIT) is the built-in world's")
    e.add_argument("--data", action="append", help="repeatable; zeroshot: a folder per class or CLIP_benchmark shards; retrieval, "
                   "caption: image-caption shards, COCO-captions or Karpathy JSON; vqa: LLaVA JSON, VLMEvalKit TSV, "
                   "or VQAv2 (a folder with the questions and annotations JSON, or the questions JSON)")
    e.set_defaults(fn=cmd_eval)
    g = sub.add_parser("generate", help="answer a prompt about an image (or a series: a series run)")
    g.add_argument("dir")
    g.add_argument("--image")
    g.add_argument("--series", help="a recording of a series run: FILE.npy (channels, length) or FILE.csv "
                   "(a row per step, a column per channel)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.set_defaults(fn=cmd_generate)
    v = sub.add_parser("serve", help="serve a run over OpenAI's chat-completions API, with a web page (docs/serve.md)")
    v.add_argument("dir")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.set_defaults(fn=cmd_serve)
    x = sub.add_parser("export", help="write a run as a Hugging Face LLaVA folder")
    x.add_argument("dir")
    x.add_argument("--format", default="hf", help="hf (LlavaForConditionalGeneration + processor)")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=cmd_export)
    d = sub.add_parser("demo", help="train + evaluate the default model on the built-in world")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_demo)
    add_data_parser(sub)
    _scale_parser(sub)
    k = sub.add_parser("distill", help="distillation: precompute teacher outputs (docs/distill.md)")
    ks = k.add_subparsers(dest="distill_command", required=True)
    kp = ks.add_parser("precompute", help="run RECIPE's distill.teachers over the records of its train.steps steps "
                       "and save their outputs by record (read back with --set distill.precomputed=DIR)")
    kp.add_argument("recipe")
    kp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the run's settings")
    kp.add_argument("--out", required=True, help="a new folder")
    kp.set_defaults(fn=cmd_distill_precompute)
    c = sub.add_parser("compare", help="train recipes to the same training FLOPs and compare them (DIR/report.md)")
    c.add_argument("recipes", nargs="*", help="default: every connector design (graft/compare.py DEFAULT_RECIPES)")
    c.add_argument("--budget", type=float, help="training FLOPs per run, vision included (default: DEFAULT_BUDGET, "
                   "6e12, ≤ 30 minutes on a 2-core CPU for the default designs and 3 seeds)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per design (default 3: mean ± sd)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every recipe")
    c.add_argument("--arm", action="append", default=[], metavar="'NAME=RECIPE KEY=VALUE ...'",
                   help="an arm that differs by settings: RECIPE with these --set keys, reported as NAME (repeatable)")
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_compare)
    r = sub.add_parser("recipes", help="list recipes, or print one's whole config (--show NAME [--set ...])")
    r.add_argument("--show", metavar="NAME", help="print the recipe's resolved config (YAML), with --set applied")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.set_defaults(fn=cmd_recipes)
    return p


def _scale_parser(sub) -> None:
    scale = sub.add_parser("scale", help="scaling laws: fit L(N, D) to points, predict the compute-optimal size"
                           ).add_subparsers(dest="scale_command", required=True)
    f = scale.add_parser("fit", help="fit E + A/N^alpha + B/D^beta (Huber, L-BFGS, bootstrap) to a CSV of points")
    f.add_argument("points", help="CSV with columns params, loss and tokens (or flops)")
    f.add_argument("--out", required=True, help="folder for fit.json, report.md, fit.png")
    f.add_argument("--drop-highest", type=int, default=0, metavar="K", help="leave out the K highest-loss points")
    f.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap refits (default 200)")
    f.add_argument("--flops", type=float, default=5.76e23, help="compute of the frontier point to report "
                   "(default: Chinchilla's 5.76e23)")
    f.set_defaults(fn=cmd_scale_fit)
    w = scale.add_parser("sweep", help="train a size ladder to isoFLOP budgets, then fit (DIR/report.md, docs/scaling.md)")
    w.add_argument("recipe", nargs="?", help="default: shapes_scale at the default budgets and sizes (graft/sweep.py)")
    w.add_argument("--budgets", type=float, nargs="+", metavar="C",
                   help="training FLOPs per run, counted as graft compare counts them")
    w.add_argument("--sizes", nargs="+", metavar="S",
                   help="parameter counts (300k 1.5M) or LM shapes WIDTHxDEPTH (64x2); graft/ladder.py")
    w.add_argument("--out", required=True)
    w.add_argument("--seeds", type=int, default=1)
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every run")
    w.add_argument("--jobs", type=int, default=1, metavar="K", help="runs at once, each pinned to its share of the cores")
    w.add_argument("--launch", choices=("slurm", "torchrun"),
                   help="write DIR/commands.txt and a Slurm array or torchrun script instead of training here")
    w.add_argument("--plan", action="store_true", help="print the plan (runs, FLOPs, estimated time) and stop")
    w.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap refits of both fits")
    w.set_defaults(fn=cmd_scale_sweep)
    p = scale.add_parser("predict", help="the compute-optimal N, D and loss at a compute, from a fit")
    p.add_argument("dir", help="a folder written by `graft scale fit` or `graft scale sweep`")
    p.add_argument("--flops", type=float, required=True)
    p.add_argument("--train", action="store_true", help="a sweep's: write the prediction, then train it and "
                   "report the error (DIR/predictions/)")
    p.add_argument("--seeds", type=int, default=1, help="with --train: seeds of the predicted run")
    p.add_argument("--jobs", type=int, default=1, help="with --train: runs at once")
    p.set_defaults(fn=cmd_scale_predict)



def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rc = args.fn(args)
    except UserError as e:
        print(f"graft: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT / SIGTERM during training: checkpoint saved, resumable
        print(f"graft: {e}", file=sys.stderr)
        return 128 + e.signum
    except RunFailed as e:  # diverged, or a collective timed out (hung)
        print(f"graft: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
