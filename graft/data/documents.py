"""The built-in world's interleaved documents (`data.images_per_doc` > 1): several images, text between them.

Document i of a split is a pure function of (seed, split, i), like every world sample: it shows world
samples i·n … i·n+n-1 of the split (n = images_per_doc), each at the start of a turn "image k: …"
followed by `data.questions_per_image` of its questions (and, with `data.caption_prob`, its caption),
and ends with questions about the images together:

    which image shows a large red circle?      → image 2     (an object in exactly one of the images)
    in image 1, what color is the square?      → green       (an image before the nearest one)

The second kind needs an image other than the nearest one, which Flamingo's default masking
(`flamingo.attend=previous`) cannot see from there: it measures what `attend=all` buys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from graft.data.samples import Place
from graft.data.shapes import CAPTION_PROMPT, Sample, ShapesWorld

CROSS_KINDS = ("which", "recall")  # the questions about the images together


@dataclass
class Document:
    samples: list[Sample]  # its images' world samples, in order
    turns: list[tuple[str, str]]
    places: list[Place]  # one per image: the start of its first turn
    kinds: list[str]  # per turn: a world question type, "caption", or one of CROSS_KINDS


def document(world: ShapesWorld, split: str, index: int, n: int, questions: int, caption_prob: float) -> Document:
    samples = [world.sample(split, index * n + k) for k in range(n)]
    rng = random.Random(f"document/{world.seed}/{split}/{index}")
    turns, places, kinds, asked = [], [], [], []
    for k, sample in enumerate(samples):
        places.append((len(turns), 0))
        chosen = [(qa.question, qa.answer, qa.kind) for qa in rng.sample(sample.qa, min(questions, len(sample.qa)))]
        if rng.random() < caption_prob:
            chosen.insert(rng.randint(0, len(chosen)), (CAPTION_PROMPT, sample.caption, "caption"))
        asked.append({question for question, _, _ in chosen})
        for j, (question, answer, kind) in enumerate(chosen):
            turns.append((f"image {k + 1}: {question}" if j == 0 else question, answer))
            kinds.append(kind)
    for kind, (question, answer) in cross_questions(samples, asked, rng):
        turns.append((question, answer))
        kinds.append(kind)
    return Document(samples, turns, places, kinds)


def cross_questions(samples: list[Sample], asked: list[set[str]], rng: random.Random) -> list[tuple[str, tuple[str, str]]]:
    """(kind, (question, answer)) about the images together; a kind the document cannot pose
    unambiguously (or only by repeating a question `asked` about that image) is left out."""
    out = []
    names = [{o.size + " " + o.name for o in s.objects} for s in samples]
    unique = [(k, name) for k, these in enumerate(names) for name in sorted(these)
              if sum(name in other for other in names) == 1]
    if unique:
        k, name = rng.choice(unique)
        out.append(("which", (f"which image shows a {name}?", f"image {k + 1}")))
    k = rng.randrange(len(samples) - 1)  # not the last image: the nearest one would not do
    fresh = [qa for qa in samples[k].qa if qa.question not in asked[k]]  # its answer is not in the text
    if fresh:
        qa = rng.choice(fresh)
        out.append(("recall", (f"in image {k + 1}, {qa.question}", qa.answer)))
    return out
