"""The `graft` command: train | eval | generate | export | demo | recipes.

User errors (bad keys, values, files) print one line and exit with code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from graft.errors import UserError


def _recipe(name: str, overrides: list[str]):
    from graft.config import apply_overrides
    from graft.recipes import RECIPES

    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}' (valid: {', '.join(RECIPES)})")
    return apply_overrides(RECIPES[name](), overrides)


def cmd_train(args) -> None:
    from graft.train.loop import train

    cfg = _recipe(args.recipe, args.set)
    results = train(cfg, args.out or f"runs/{cfg.name}")
    if results:
        _print_results(results)


def cmd_eval(args) -> None:
    from graft.eval.harness import evaluate
    from graft.rundir import RunDir, build_processor

    run = RunDir(args.dir)
    cfg, tok, model, ckpt = run.load()
    if args.split:
        from graft.config import validate

        cfg.eval.splits = [args.split]
        validate(cfg)  # names a bad split in one line
    results = evaluate(model, build_processor(cfg, tok, model), cfg)
    run.eval_path.write_text(json.dumps(results, indent=1))
    print(f"evaluated {ckpt}")
    _print_results(results)


def cmd_generate(args) -> None:
    from graft.data.processor import load_image
    from graft.eval.vqa import answer
    from graft.rundir import RunDir, build_processor

    run = RunDir(args.dir)
    image = load_image(args.image)
    cfg, tok, model, _ = run.load()
    proc = build_processor(cfg, tok, model)
    print(answer(model, proc, [(image, args.prompt)], 1, args.max_new_tokens)[0])


def cmd_export(args) -> None:
    from graft.export import export

    out = export(args.dir, args.out, args.format)
    print(f"exported {args.dir} to {out} (load with transformers.AutoModelForImageTextToText / AutoProcessor)")


def cmd_demo(args) -> None:
    from graft.recipes import shapes_vqa
    from graft.report import write_report
    from graft.train.loop import train

    out = Path(args.out)
    cfg = _recipe("shapes_vqa", args.set) if args.set else shapes_vqa()
    print(f"graft demo: training '{cfg.name}' on the built-in Shapes world into {out}", flush=True)
    t0 = time.perf_counter()
    results = train(cfg, out)
    seconds = time.perf_counter() - t0
    report = write_report(out, cfg.name, results, seconds)
    _print_results(results)
    print(f"\nrun directory: {out}   report: {report}")


def cmd_recipes(args) -> None:
    from graft.recipes import RECIPES

    for name, fn in RECIPES.items():
        print(f"{name:16s} {(fn.__doc__ or '').strip().splitlines()[0]}")


def _print_results(results: dict) -> None:
    from graft.report import results_table

    print(results_table(results))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Add vision to language models and train them.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe (re-run to resume)")
    t.add_argument("recipe")
    t.add_argument("--out", help="run directory (default runs/RECIPE)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run; writes DIR/eval.json")
    e.add_argument("dir")
    e.add_argument("--split", help="one split (test, val, compositional, train); default: the config's")
    e.set_defaults(fn=cmd_eval)
    g = sub.add_parser("generate", help="answer a prompt about an image")
    g.add_argument("dir")
    g.add_argument("--image", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.set_defaults(fn=cmd_generate)
    x = sub.add_parser("export", help="write a run as a Hugging Face LLaVA folder")
    x.add_argument("dir")
    x.add_argument("--format", default="hf", help="hf (LlavaForConditionalGeneration + processor)")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=cmd_export)
    d = sub.add_parser("demo", help="train + evaluate the default model on the built-in world")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("recipes", help="list recipes")
    r.set_defaults(fn=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"graft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
