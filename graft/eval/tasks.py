"""Evaluation tasks on a user's own data: `graft eval RUN --task NAME --data PATH [--set eval.KEY=...]`.

One registry entry per task: a function (model, processor, config, path) → (metrics, predictions).
The metrics go to `RUN/eval.json`, the per-example predictions (id, prediction, reference,
correct) to `RUN/eval_<task>.jsonl`. Today: `zeroshot` (eval/labelled.py) and `retrieval`
(eval/captioned.py) for dual encoders, `caption` (CIDEr-D, BLEU-4 on the same image–caption
layouts) and `vqa` (eval/questions.py: LLaVA-style JSON, exact match; VLMEvalKit TSV, multiple
choice) for VLMs. Not yet: VQAv2's soft accuracy over 10 human answers, zero-shot with a VLM, and
the built-in world's evaluations as entries of this registry (eval/harness.py).
"""

from __future__ import annotations

from graft.data.skips import records_skipped
from graft.errors import UserError


def _zeroshot(model, proc, cfg, path: str):
    from graft.eval.labelled import load_labelled
    from graft.eval.zero_shot import zero_shot_on

    if cfg.model != "dual":
        raise UserError("--task zeroshot needs a dual-encoder run (clip, siglip, clippo, lit); "
                        "scoring class names with a VLM is not there yet")
    data = load_labelled(path, cfg.data.max_image_bytes)
    metrics, predictions = zero_shot_on(model, proc, data, cfg)
    return metrics | {"zeroshot_skipped": records_skipped(data.log.skipped)}, predictions


def _retrieval(model, proc, cfg, path: str):
    from graft.eval.captioned import load_captioned
    from graft.eval.retrieval import retrieval_on

    if cfg.model != "dual":
        raise UserError("--task retrieval needs a dual-encoder run (clip, siglip, clippo, lit)")
    data = load_captioned(path, cfg.data)
    metrics, predictions = retrieval_on(model, proc, data, cfg)
    return metrics | {"retrieval_skipped": records_skipped(data.log.skipped)}, predictions


def _caption(model, proc, cfg, path: str):
    from graft.eval.captioned import load_captioned
    from graft.eval.captioning import caption_on

    if cfg.model == "dual":
        raise UserError("--task caption needs a VLM run (a dual encoder does not generate text)")
    data = load_captioned(path, cfg.data)
    metrics, predictions = caption_on(model, proc, data, cfg)
    return metrics | {"caption_skipped": records_skipped(data.log.skipped)}, predictions


def _vqa(model, proc, cfg, path: str):
    from graft.eval.questions import load_questions
    from graft.eval.vqa import vqa_on

    if cfg.model == "dual":
        raise UserError("--task vqa needs a VLM run (a dual encoder does not generate text)")
    data = load_questions(path, cfg.data)
    metrics, predictions = vqa_on(model, proc, data, cfg)
    return metrics | {"vqa_skipped": records_skipped(data.log.skipped)}, predictions


TASKS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "caption": _caption, "vqa": _vqa}
