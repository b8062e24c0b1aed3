"""Grounded spatial questions and the spatial head's targets: training-only signals that teach
the built-in world's spatial relations (`data.grounded_spatial`, `data.spatial_compare`;
docs/spatial.md).

A spatial question ("is the red circle left of the blue square?") is learned only if the model
fetches each named object's position where the name stands and compares the two at the answer;
with the yes/no answer as the only target, nothing rewards the first step and training sits at
chance. With probability `data.grounded_spatial`, a training spatial question is asked Kosmos-2
style, each name followed by its cell — "is the red circle at top left left of the blue square at
bottom center?" — and the location words are supervised (next-token loss) besides the answer.
Evaluation questions are never grounded, so the test wording and scoring stay the world's.

The supervision travels out of band: the question is a `Supervised` string that carries the
character spans to label. Only the world's own training source makes one; text read from data
is a plain string and is never labelled in the prompt (Processor.encode_conversation).
"""

from __future__ import annotations

import random

from graft.data.shapes import QA, RELATIONS, Obj, Sample, _question

ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")


class Supervised(str):
    """A prompt string whose `spans` [(start, end), ...] of characters are training targets, and
    for a spatial question with `data.spatial_compare`, the spatial head's target at its answer
    (`compare`: how the first named object's column and row compare with the second's, 0 less,
    1 equal, 2 greater; models/spatial_head.py)."""

    spans: tuple[tuple[int, int], ...] = ()
    compare: tuple[int, int] | None = None


def location(o: Obj) -> str:
    """The words naming an object's cell on the world's 3x3 board ("top left")."""
    return f"{ROWS[o.row]} {COLUMNS[o.col]}"


def ground(question: str, objects: list[Obj]) -> Supervised:
    """`question` with " at ROW COLUMN" after each named object, and the spans of the ROW COLUMN words."""
    named = sorted((question.find(f" {o.name}"), o) for o in objects if f" {o.name}" in question)
    text, spans, cursor = "", [], 0
    for at, o in named:
        end = at + 1 + len(o.name)
        text += question[cursor:end] + " at"
        spans.append((len(text), len(text) + 1 + len(location(o))))
        text += " " + location(o)
        cursor = end
    out = Supervised(text + question[cursor:])
    out.spans, out.compare = tuple(spans), getattr(question, "compare", None)
    return out


def order(a: int, b: int) -> int:
    """0, 1, 2 as a is less than, equal to or greater than b."""
    return (a > b) - (a < b) + 1


def comparison(question: str, objects: list[Obj]) -> tuple[int, int]:
    """How a spatial question's first named object's column and row compare with its second's."""
    x, y = (o for _, o in sorted((question.find(f" {o.name}"), o) for o in objects if f" {o.name}" in question))
    return order(x.col, y.col), order(x.row, y.row)


def compared_turns(sample: Sample, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`turns` with each spatial question carrying the spatial head's target (`data.spatial_compare`)."""
    spatial, out = spatial_set(sample), []
    for q, a in turns:
        if q in spatial:
            target, q = comparison(q, sample.objects), Supervised(q)
            q.compare = target
        out.append((q, a))
    return out


def more_spatial(sample: Sample, turns: list[tuple[str, str]], k: int, rng: random.Random) -> list[tuple[str, str]]:
    """`turns` with `k` more spatial questions about `sample` at random places, if the scene allows
    one (`data.spatial_questions`): more answers per step that need the relation, the scene's
    other questions unchanged. A pair and relation may repeat one already asked."""
    if not spatial_set(sample):
        return turns
    turns = list(turns)
    for _ in range(k):
        qa = _question("spatial", sample.objects, rng, None)
        turns.insert(rng.randint(0, len(turns)), (qa.question, qa.answer))
    return turns


def spatial_set(sample: Sample) -> set[str]:
    """Every spatial question the world can ask about `sample`: each ordered pair of uniquely named
    objects with each relation."""
    named = [o for o in sample.objects if sum(p.name == o.name for p in sample.objects) == 1]
    return {f"is the {a.name} {rel} the {b.name}?" for a in named for b in named if a is not b for rel in RELATIONS}


def grounded_turns(sample: Sample, turns: list[tuple[str, str]], share: float, rng: random.Random) -> list[tuple[str, str]]:
    """`turns` about `sample` with each spatial question grounded with probability `share` (one draw
    of `rng` per spatial question, none for the others)."""
    spatial = spatial_set(sample)
    return [(ground(q, sample.objects), a) if q in spatial and rng.random() < share else (q, a) for q, a in turns]


def grounded_questions(questions: list[QA], objects: list[Obj]) -> list[str]:
    """The grounded form of each spatial question among `questions` (the tokenizer's corpus)."""
    return [str(ground(qa.question, objects)) for qa in questions if qa.kind == "spatial"]
