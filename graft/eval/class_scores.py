"""Zero-shot classification with a VLM (`graft eval RUN --task zeroshot` on a VLM run): each class is
scored by how likely the model finds its name as the answer.

For an image and every class c and template t, the conversation (prompt, t.format(c)) is laid out
exactly as in training (the processor's chat layout; the answer ends with the end-of-turn token),
and scored by the summed log-probability of its answer tokens; a class scores the mean over its
templates; the best class is the prediction. The prompt is `eval.zeroshot_prompt`, by default the
run's `data.caption_prompt` (describing a whole image is what a captioning VLM has learned). Class
names and templates as for dual encoders (eval/zero_shot.py: `eval.zeroshot_file`, the data set's
own, else "a photo of a {}."). Cost: classes x templates answer sequences per image; each image
is encoded once and its tokens reused for all of them.
"""

from __future__ import annotations

import torch

from graft.eval.shard import shard_map
from graft.eval.zero_shot import classify, user_prompts
from graft.losses import IGNORE


def answer_logprobs(model, proc, images: list, prompt: str, answers: list[str], batch_size: int) -> torch.Tensor:
    """(len(images), len(answers)): log p(answer | image, prompt), summed over the answer's tokens;
    each process scores its share of the images (eval/shard.py)."""
    rows = shard_map(lambda share: list(_answer_logprobs(model, proc, share, prompt, answers, batch_size)), images)
    return torch.stack(rows)


@torch.no_grad()
def _answer_logprobs(model, proc, images: list, prompt: str, answers: list[str], batch_size: int) -> torch.Tensor:
    rows = [proc.conversation([(prompt, a)]) for a in answers]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), proc.tok.pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):  # right-padded: a causal LM never looks at the padding
        ids[r, : len(i)], labels[r, : len(lab)] = torch.tensor(i), torch.tensor(lab)
    device = next(model.parameters()).device
    feats = model.image_tokens(torch.stack([proc.pixels(im) for im in images]).to(device))  # (I, N, D)
    pairs = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(answers)))  # (I * A, 2)
    scores = torch.empty(len(images), len(answers))
    for chunk in pairs.split(batch_size):
        image, answer = chunk[:, 0], chunk[:, 1]
        x, y = ids[answer].to(device), labels[answer, 1:].to(device)
        logits = model(x, image_tokens=feats[image.to(device)])[0][:, :-1].float()
        token = logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        scores[image, answer] = (token * (y != IGNORE)).sum(1).cpu()
    return scores


@torch.no_grad()
def zero_shot_vlm(model, proc, data, cfg) -> tuple[dict[str, float], list[dict]]:
    classes, templates = user_prompts(data, cfg)
    prompt = cfg.eval.zeroshot_prompt or cfg.data.caption_prompt
    answers = [t.format(c) for c in classes for t in templates]

    def scores(images: list) -> torch.Tensor:
        logp = answer_logprobs(model, proc, images, prompt, answers, cfg.eval.batch_size)
        return logp.view(len(images), len(classes), len(templates)).mean(-1)

    return classify(data, cfg, classes, scores)
