"""`graft data ...`: check, show, export the built-in world or its noisy pool, and curate shards
(score, filter, recaption). Each command imports what it runs inside its function, so that
`graft --help` stays quick (no torch); graft/cli.py adds these to its parser."""

from __future__ import annotations

import shlex
from pathlib import Path

from graft.errors import UserError


def recipe_of(name: str, overrides: list[str]):
    """A recipe's config with `--set` overrides, validated (every command's)."""
    from graft.recipes import recipe  # (imports torch: `graft --help` stays instant)

    return recipe(name, overrides)


def cmd_data_check(args) -> int:
    from graft.data.check import check_data, processor_for

    cfg = recipe_of(args.recipe, args.set)
    result = check_data(cfg, processor_for(cfg), args.n)
    print(f"graft data check: {cfg.name}, data.source={cfg.data.source}")
    print(result.report())
    return 0 if result.ok else 1


def cmd_data_show(args) -> None:
    from graft.data.show import show

    print(show(recipe_of(args.recipe, args.set), args.n, args.out, args.run, args.split).line())


def cmd_data_export_shapes(args) -> None:
    from graft.data.export import export_shapes

    if args.n <= 0 or args.shard_size <= 0:
        raise UserError(f"--n={args.n} and --shard-size={args.shard_size} must be positive")
    cfg = recipe_of(args.recipe, args.set)
    settings = export_shapes(cfg, args.format, Path(args.out), args.n, args.shard_size)
    print(f"wrote {args.n} samples of the {cfg.name} world to {args.out} ({args.format})")
    command = ["graft", "train", args.recipe, "--out", f"runs/{args.recipe}-{args.format}"]
    command += [x for kv in settings for x in ("--set", kv)]
    print(f"train on them: {shlex.join(command)}")  # quoted: pasted into a shell, braces stay braces


def cmd_data_export_noisy(args) -> None:
    from graft.data.noisy_export import export_noisy

    if args.n <= 0 or args.shard_size <= 0:
        raise UserError(f"--n={args.n} and --shard-size={args.shard_size} must be positive")
    cfg = recipe_of(args.recipe, ["data.source=noisy", *args.set])
    settings = export_noisy(cfg, Path(args.out), args.n, args.shard_size)
    print(f"wrote {args.n} records of the noisy-web pool to {args.out} (each record's noise in its .json and the "
          "shard's .parquet)")
    command = ["graft", "train", args.recipe, "--out", f"runs/{args.recipe}-noisy"]
    print(f"train on them: {shlex.join(command + [x for kv in settings for x in ('--set', kv)])}")


def cmd_data_score(args) -> None:
    from graft.data.score import score_shards

    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size} must be positive")
    t = score_shards(args.shards, args.with_run, Path(args.out), args.embeddings, args.batch_size, args.score)
    print(f"graft data score: {t['records']} records of {t['shards']} shards scored, {t['skipped']} skipped "
          f"(counts per shard in each .parquet's metadata) -> {args.out}")


def cmd_data_filter(args) -> None:
    from graft.data.filter import filter_shards

    m = filter_shards(args.shards, Path(args.scores), args.keep, Path(args.out))
    print(f"graft data filter: kept {m['kept']} of {m['records']} records -> {args.out}")
    for rule, n in m["dropped"].items():
        print(f"  {rule}: dropped {n}")
    if "truth" in m:
        t = m["truth"]
        print(f"  against the noisy world's truth ({t['noisy']} noisy of {t['records']}): precision "
              f"{t['precision']:.3f}, recall {t['recall']:.3f}")


def cmd_data_recaption(args) -> None:
    from graft.data.recaption import recaption

    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise UserError(f"--batch-size={args.batch_size} and --max-new-tokens={args.max_new_tokens} must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature={args.temperature} must be >= 0 and --top-p={args.top_p} in (0, 1]")
    sampling = (args.temperature, args.top_p, args.seed) if args.temperature > 0 else None
    if (args.filter_with is None) != (args.min_score is None):
        raise UserError("--filter-with SCORER and --min-score T go together (CapFilt's filter)")
    if args.filter_score != "itc" and args.filter_with is None:
        raise UserError(f"--filter-score {args.filter_score} goes with --filter-with SCORER --min-score T")
    t = recaption(args.shards, args.with_run, Path(args.out), args.batch_size, args.max_new_tokens, sampling,
                  args.filter_with, args.min_score or 0.0, args.filter_score)
    print(f"graft data recaption: {t['shards']} shards, {t['skipped']} records skipped, {t['rejected']} dropped by "
          f"the filter -> {args.out} (train with "
          "data.caption_mix=P to read KEY.syn.txt with probability P)")


def add_data_parser(sub) -> None:
    from graft.data.export import FORMATS

    data = sub.add_parser("data", help="check or show a recipe's data; export the built-in world or its noisy-web pool").add_subparsers(
        dest="data_command", required=True)
    c = data.add_parser("check", help="read a sample of a recipe's data through the processor; exit 1 if unusable")
    c.add_argument("recipe")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--n", type=int, default=1000, help="records to read (at most one pass)")
    c.set_defaults(fn=cmd_data_check)
    s = data.add_parser("show", help="draw a recipe's first training samples and their text to a PNG "
                        "(with --run, a VLM's answers too)")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--n", type=int, default=8, help="samples to draw (first usable records)")
    s.add_argument("--run", metavar="RUN_DIR", help="a trained VLM run: draw its answer to each question")
    s.add_argument("--split", default="train", help="built-in world: train (default), val, test or compositional")
    s.add_argument("--out", required=True, metavar="FILE.png")
    s.set_defaults(fn=cmd_data_show)
    x = data.add_parser("export-shapes", help="write the built-in world as webdataset shards, LLaVA JSON or an HF dataset")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--out", required=True)
    x.add_argument("--n", type=int, required=True, help="number of samples")
    x.add_argument("--recipe", default="shapes_vqa", help="recipe whose world settings to use")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    x.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per shard")
    x.set_defaults(fn=cmd_data_export_shapes)
    y = data.add_parser("export-noisy", help="write the built-in world's noisy-web pool (data.noise) as img2dataset "
                        "shards, each record's noise recorded")
    y.add_argument("--out", required=True, help="a new folder")
    y.add_argument("--n", type=int, required=True, help="number of records")
    y.add_argument("--recipe", default="clip", help="recipe whose world settings to use")
    y.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. data.noise={mismatch: 0.5}")
    y.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    y.set_defaults(fn=cmd_data_export_noisy)
    z = data.add_parser("score", help="each record's image-caption similarity under a dual-encoder run: a .parquet "
                        "per shard (DataComp's CLIP score); the same command resumes")
    z.add_argument("shards", help="a folder of *.tar, a shard, or a brace pattern")
    z.add_argument("--with", dest="with_run", required=True, metavar="MODEL", help="a dual-encoder run (clip, "
                   "siglip, clippo, lit, coca, qformer_stage1) or a local HF CLIP/SigLIP folder")
    z.add_argument("--out", required=True, help="a new folder, or one this command started (it resumes)")
    z.add_argument("--embeddings", action="store_true", help="also save each shard's image and text embeddings (.npy)")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--score", default="itc", help="itc: the contrastive similarity (default); itm: the probability "
                   "of the run's image-text matching head (contrastive.itm_layers > 0, qformer_stage1)")
    z.set_defaults(fn=cmd_data_score)
    f = data.add_parser("filter", help="keep the records that pass every --keep rule (CLIP score, caption, "
                        "duplicates, near an evaluation set) as new shards, with a manifest")
    f.add_argument("shards", help="a folder of *.tar, a shard, or a brace pattern")
    f.add_argument("--scores", required=True, help="what `graft data score` wrote for these shards")
    f.add_argument("--keep", action="append", default=[], metavar="RULE", help="repeatable: score>=T, top=F, "
                   "random=F, words>=N, no_boilerplate, dedup, near_dup<C, far_from=DIR<C (docs/curation.md)")
    f.add_argument("--out", required=True, help="a new folder")
    f.set_defaults(fn=cmd_data_filter)
    r = data.add_parser("recaption", help="a VLM run writes a synthetic caption per image (KEY.syn.txt) beside the "
                        "original, into new shards; the same command resumes")
    r.add_argument("shards", help="a folder of *.tar, a shard, or a brace pattern")
    r.add_argument("--with", dest="with_run", required=True, metavar="VLM_RUN")
    r.add_argument("--out", required=True, help="a new folder, or one this command started (it resumes)")
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: nucleus sampling")
    r.add_argument("--top-p", type=float, default=0.9, help="with --temperature: the nucleus (BLIP: 0.9)")
    r.add_argument("--seed", type=int, default=0, help="with --temperature: the sampling seed")
    r.add_argument("--filter-with", metavar="SCORER", help="CapFilt: a dual-encoder run or HF CLIP/SigLIP folder that "
                   "keeps each caption (original, synthetic) whose score reaches --min-score")
    r.add_argument("--min-score", type=float, help="with --filter-with: the similarity a caption needs")
    r.add_argument("--filter-score", default="itc", help="with --filter-with: itc (similarity, default) or itm "
                   "(the scorer's image-text matching probability, as BLIP's filter)")
    r.set_defaults(fn=cmd_data_recaption)
