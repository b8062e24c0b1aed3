"""Evaluation throughput: graft's batched VQA generation (KV cache) against the same model as
`transformers.LlavaForConditionalGeneration.generate`, plus captioning, VLM zero-shot and
dual-encoder zero-shot / retrieval rates.

The VLM is a trained run (e.g. `graft demo --out runs/demo`); its weights are exported to HF LLaVA
in memory (`graft.models.hf_llava.to_llava`), so both sides hold the same weights and see the same
prompts, grouped by prompt length into the same batches (no padding on either side). graft and
HF are timed alternately, `--rounds` times each; medians are printed, with the share of answers
on which the two agree. Everything runs in one process: keep the machine otherwise idle.

    python benchmarks/eval_throughput.py --run runs/demo [--dual runs/clip] [--questions 600]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections import defaultdict

import torch

from graft.data.shapes import CAPTION_PROMPT, CLASSES, ShapesWorld
from graft.data.world_source import make_world
from graft.eval.class_scores import answer_logprobs
from graft.eval.vqa import answer, questions
from graft.eval.zero_shot import TEMPLATES
from graft.models.hf_llava import to_llava
from graft.build import build_processor, load_run
from graft.rundir import RunDir


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained VLM run directory")
    p.add_argument("--dual", help="a trained dual-encoder run directory (zero-shot and retrieval rates)")
    p.add_argument("--questions", type=int, default=600, help="VQA questions (test split, spread over the types)")
    p.add_argument("--images", type=int, default=240, help="images for captioning and zero-shot")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def timed(fn, rounds: int) -> tuple[float, object]:
    """Median seconds of `rounds` calls, and the last result."""
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def hf_answers(hf, proc, prompts, batch_size: int, max_new_tokens: int) -> list[str]:
    """The same greedy answers with HF's generate, batched exactly as graft's `answer` batches."""
    encoded = [(proc.prompt(q), proc.pixels(img)) for img, q in prompts]
    by_len, out = defaultdict(list), [""] * len(prompts)
    for i, (ids, _) in enumerate(encoded):
        by_len[len(ids)].append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            ids = torch.tensor([encoded[i][0] for i in chunk])
            new = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              pixel_values=torch.stack([encoded[i][1] for i in chunk]),
                              max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=proc.tok.eos,
                              pad_token_id=proc.tok.pad)[:, ids.shape[1]:]
            for i, row in zip(chunk, new.tolist()):
                out[i] = proc.tok.decode(row[: row.index(proc.tok.eos)] if proc.tok.eos in row else row)
    return out


def vlm_rates(args) -> list[str]:
    cfg, tok, model, _ = load_run(RunDir(args.run))
    model.eval()
    proc, world, bs = build_processor(cfg, tok, model), make_world(cfg), cfg.eval.batch_size
    hf = to_llava(model, cfg, tok).eval()
    hf.config._attn_implementation = "sdpa"
    items = questions(world, "test", args.questions // 6)
    prompts = [(world.sample("test", i).image, qa.question) for i, qa in items]
    lines, ours_s, theirs_s = [], [], []
    for _ in range(args.rounds):  # alternate graft and HF, so that machine noise hits both
        t, ours = timed(lambda: answer(model, proc, prompts, bs, 4), 1)
        u, theirs = timed(lambda: hf_answers(hf, proc, prompts, bs, 4), 1)
        ours_s.append(t), theirs_s.append(u)
    g, h = statistics.median(ours_s), statistics.median(theirs_s)
    agree = sum(a == b for a, b in zip(ours, theirs)) / len(prompts)
    lines.append(f"VQA generation ({len(prompts)} questions, batch {bs}, 4 new tokens): graft {len(prompts) / g:.0f} "
                 f"questions/s, HF generate {len(prompts) / h:.0f} questions/s, ratio {h / g:.2f}x; answers agree {agree:.3f}")
    samples = [world.sample("test", i) for i in range(args.images)]
    caps = [(s.image, CAPTION_PROMPT) for s in samples]
    c, _ = timed(lambda: answer(model, proc, caps, bs, cfg.eval.max_new_tokens), args.rounds)
    lines.append(f"captioning ({args.images} images, up to {cfg.eval.max_new_tokens} new tokens): {args.images / c:.0f} images/s")
    single = ShapesWorld(world.image_size, world.grid, max_objects=1, seed=world.seed)
    images = [single.sample("test", i).image for i in range(args.images)]
    answers = [t.format(c) for c in CLASSES for t in TEMPLATES]
    z, _ = timed(lambda: answer_logprobs(model, proc, images, CAPTION_PROMPT, answers, bs), args.rounds)
    lines.append(f"VLM zero-shot ({len(CLASSES)} classes x {len(TEMPLATES)} templates, {args.images} images): "
                 f"{args.images / z:.1f} images/s")
    return lines


def dual_rates(args) -> list[str]:
    from graft.eval.retrieval import retrieval
    from graft.eval.zero_shot import zero_shot

    cfg, tok, model, _ = load_run(RunDir(args.dual))
    model.eval()
    proc, world, bs = build_processor(cfg, tok, model), make_world(cfg), cfg.eval.batch_size
    z, _ = timed(lambda: zero_shot(model, proc, world, "test", 1000, None, bs), args.rounds)
    r, _ = timed(lambda: retrieval(model, proc, world, "test", 1000, bs), args.rounds)
    return [f"dual-encoder zero-shot (1,000 images, 24 classes): {1000 / z:.0f} images/s",
            f"dual-encoder retrieval (1,000 pairs, both ways): {1000 / r:.0f} pairs/s"]


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    lines = vlm_rates(args) + (dual_rates(args) if args.dual else [])
    print(f"threads: {torch.get_num_threads()}")
    print("\n".join(lines))
    print("command: python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
