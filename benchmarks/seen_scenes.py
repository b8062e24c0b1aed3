"""How much of a Shapes VLM's test accuracy is on scenes it trained on?

The built-in world is finite in its scenes (objects x colours x sizes x cells), so an
in-distribution test image can repeat a training scene: every one-object scene of the 3x3 world
is met within the first few thousand training samples. This script regenerates the scenes a run
trained on (sample indices 0 .. steps x batch x processes - 1 of the train split), splits the
run's VQA test questions into those about a scene seen in training and those about an unseen one
(same objects, sizes and cells; background shade ignored), and reports accuracy for each.

    python benchmarks/seen_scenes.py RUN_DIR [--split test] [--per-type 300] [--processes 1]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from graft.data.shapes import QUESTION_TYPES
from graft.data.world_source import make_world
from graft.eval.vqa import answer, normalise, questions
from graft.build import build_processor, load_run
from graft.rundir import RunDir


def scene_key(sample) -> tuple:
    return tuple(sorted((o.shape, o.color, o.size, o.row, o.col) for o in sample.objects))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--split", default="test")
    p.add_argument("--per-type", type=int, default=300)
    p.add_argument("--processes", type=int, default=1, help="world size the run trained with")
    args = p.parse_args()
    cfg, tok, model, ckpt = load_run(RunDir(args.run))
    step = int(ckpt.name.removeprefix("step_"))
    proc = build_processor(cfg, tok, model)
    world = make_world(cfg)
    n_train = step * cfg.train.batch_size * args.processes
    seen = {scene_key(world.sample("train", i)) for i in range(n_train)}

    items = questions(world, args.split, args.per_type)
    samples = [world.sample(args.split, i) for i, _ in items]
    with torch.no_grad():
        preds = answer(model, proc, [(s.image, qa.question) for s, (_, qa) in zip(samples, items)],
                       cfg.eval.batch_size, max_new_tokens=4)
    right = defaultdict(list)  # (kind, seen?) -> [correct?]
    for s, (_, qa), pred in zip(samples, items, preds):
        right[qa.kind, scene_key(s) in seen].append(normalise(pred) == normalise(qa.answer))

    def cell(kinds, was_seen) -> str:
        v = [x for k in kinds for x in right[k, was_seen]]
        return f"{sum(v) / len(v):.3f} ({len(v)})" if v else "- (0)"

    print(f"{args.run}: step {step}, {n_train} training samples, {len(seen)} distinct training scenes")
    print(f"VQA exact match on the {args.split} split (questions):\n")
    print("| type | scene seen in training | scene not seen |\n|---|---|---|")
    for name, kinds in [("all", QUESTION_TYPES)] + [(k, [k]) for k in QUESTION_TYPES]:
        print(f"| {name} | {cell(kinds, True)} | {cell(kinds, False)} |")

    # vqa_acc weighs every type equally (same number of questions each); so does this row.
    def type_mean(was_seen) -> str:
        accs = [sum(v) / len(v) for k in QUESTION_TYPES if (v := right[k, was_seen])]
        return f"{sum(accs) / len(accs):.3f}"

    print(f"| mean over types | {type_mean(True)} | {type_mean(False)} |")
    print(f"\ncommand: python benchmarks/seen_scenes.py {args.run} --split {args.split} --per-type {args.per_type}")


if __name__ == "__main__":
    main()
