"""The built-in world in motion: short clips of Shapes-world boards in which objects move, appear,
disappear or change colour; no download. Clip `index` of `split` is a pure function of (seed,
split, index), as every world sample is.

A clip is `frames` frames (each a Shapes-world board, drawn by its renderer) of 1..max_objects
objects with distinct colour–shape names. Each object does one thing over the clip:

    still       stays in its cell
    moves       one cell per frame, left, right, up or down (its path stays on the board)
    appears     is absent from the first frames, present from frame k (1 < k <= frames)
    disappears  is present in the first frames, absent from frame k
    turns       changes colour at frame k

No two objects share a cell in any frame. Questions (`QUESTION_TYPES`), one per type the clip
allows, each about an object named unambiguously (by shape, or by colour and shape):

    direction  which way did the red circle move?      left | right | up | down | it did not move
    order      what appeared?                           the green cross      (a clip with one appearance)
    frames     how many frames show the blue square?   1 .. frames
    color      what color is the square at the start?  red                  (its first frame's)
    change     what color did the triangle turn?        yellow               (an object that turned)

Each needs the frames in order (`color` asks for the first one's). The questions lean towards
the objects that make them informative (a moving one for `direction`, an appearing or disappearing
one for `frames`), so that no answer dominates a type: the most common answer of a type is at
most half of its test questions (3 frames: "it did not move" 0.40 of `direction`, "3" 0.49 of
`frames`, every other type under 0.21; tests/test_motion.py). The caption says what each object did
("a small red circle moves left and a large blue square appears").
Splits: train / val / test draw from the same distribution; test is for evaluation only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image

from graft.data.shapes import COLORS, QA, SHAPES, SIZES, Obj, ShapesWorld

SPLITS = ("train", "val", "test")
EVENTS = ("still", "moves", "appears", "disappears", "turns")
WEIGHTS = (0.1, 0.35, 0.2, 0.2, 0.15)  # how often each event is drawn: moves most, for `direction`'s four answers
LEAN = 0.8  # how often a question picks an object that makes it informative, where the clip has one
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
QUESTION_TYPES = ("direction", "order", "frames", "color", "change")
CLIP_PROMPT = "describe the clip."
STILL = "it did not move"


@dataclass(frozen=True)
class Actor:
    """An object and what it does: `start` (its cell and colour at frame 0), the event, its
    direction (moves) or frame (appears, disappears, turns), and its colour after turning."""
    start: Obj
    event: str
    direction: str = ""
    frame: int = 0
    new_color: str = ""

    def at(self, t: int) -> Obj | None:
        """The object in frame t, or None where it is not shown."""
        o = self.start
        if self.event == "moves":
            dr, dc = DIRECTIONS[self.direction]
            return replace(o, row=o.row + dr * t, col=o.col + dc * t)
        if (self.event == "appears" and t < self.frame) or (self.event == "disappears" and t >= self.frame):
            return None
        if self.event == "turns" and t >= self.frame:
            return replace(o, color=self.new_color)
        return o


@dataclass
class Clip:
    frames: list[Image.Image]
    caption: str
    qa: list[QA]
    actors: list[Actor]

    def question(self, kind: str) -> QA | None:
        return next((q for q in self.qa if q.kind == kind), None)


class MotionWorld:
    def __init__(self, image_size: int = 24, grid: int = 4, max_objects: int = 2, frames: int = 3, seed: int = 0):
        if frames < 2 or frames > grid:
            raise ValueError(f"frames={frames}: a clip needs 2..grid ({grid}) frames (a move must fit the board)")
        self.board = ShapesWorld(image_size, grid, max_objects, seed)
        self.grid, self.max_objects, self.frames, self.seed = grid, max_objects, frames, seed

    def sample(self, split: str, index: int) -> Clip:
        actors, background, qa = self._content(split, index)
        frames = [self.board.render([o for a in actors if (o := a.at(t)) is not None], background)
                  for t in range(self.frames)]
        return Clip(frames, caption(actors), qa, actors)

    def text(self, split: str, index: int) -> tuple[str, list[QA]]:
        """Clip `index`'s caption and questions, without drawing it (a tokenizer's corpus)."""
        actors, _, qa = self._content(split, index)
        return caption(actors), qa

    def _content(self, split: str, index: int) -> tuple[list[Actor], int, list[QA]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        rng = random.Random(f"motion/{self.seed}/{split}/{index}")
        actors = self._actors(rng)
        qa = [q for kind in QUESTION_TYPES if (q := _question(kind, actors, self.frames, rng)) is not None]
        return actors, rng.randint(20, 70), qa

    def _actors(self, rng: random.Random) -> list[Actor]:
        """1..max_objects actors whose cells never meet (drawn again until they do not)."""
        n = rng.randint(1, self.max_objects)
        while True:
            names = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
            actors = [self._actor(rng, color, shape) for color, shape in names]
            if all(_apart(actors, t) for t in range(self.frames)):
                return actors

    def _actor(self, rng: random.Random, color: str, shape: str) -> Actor:
        event, g, last = rng.choices(EVENTS, WEIGHTS)[0], self.grid, self.frames - 1
        if event == "moves":
            direction = rng.choice(list(DIRECTIONS))
            dr, dc = DIRECTIONS[direction]
            rows = [r for r in range(g) if 0 <= r + dr * last < g]
            cols = [c for c in range(g) if 0 <= c + dc * last < g]
            return Actor(Obj(shape, color, rng.choice(SIZES), rng.choice(rows), rng.choice(cols)), event, direction)
        start = Obj(shape, color, rng.choice(SIZES), rng.randrange(g), rng.randrange(g))
        if event == "still":
            return Actor(start, event)
        new_color = rng.choice([c for c in COLORS if c != color]) if event == "turns" else ""
        return Actor(start, event, frame=rng.randint(1, last), new_color=new_color)


def timed(question: str, frames: int) -> tuple[str, list[int]]:
    """`question` after each frame's timestamp, "frame 1: <frame> frame 2: <frame> ... question" (the
    way LLaVA-Video tells the LM when each frame was taken): the text and the frames' character
    offsets in it (`data.frame_labels`)."""
    text, at = "", []
    for k in range(frames):
        text += f"frame {k + 1}:" if k == 0 else f" frame {k + 1}:"
        at.append(len(text))
    return f"{text} {question}", at


def _apart(actors: list[Actor], t: int) -> bool:
    cells = [(o.row, o.col) for a in actors if (o := a.at(t)) is not None]
    return len(cells) == len(set(cells))


def _did(a: Actor) -> str:
    o = a.start
    what = {"still": "stays still", "moves": f"moves {a.direction}", "appears": "appears",
            "disappears": "disappears", "turns": f"turns {a.new_color}"}[a.event]
    return f"a {o.size} {o.color} {o.shape} {what}"


def caption(actors: list[Actor]) -> str:
    """What each object does, in reading order of its first cell."""
    parts = [_did(a) for a in sorted(actors, key=lambda a: (a.start.row, a.start.col))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _lean(rng: random.Random, telling: list[Actor], others: list[Actor]) -> Actor | None:
    """One of `telling` with probability LEAN where there is one, else one of `others` (or None)."""
    if telling and (not others or rng.random() < LEAN):
        return rng.choice(telling)
    return rng.choice(others) if others else None


def _named(actors: list[Actor], a: Actor) -> str:
    """The shortest unambiguous name of `a` among `actors`: its shape, else colour and shape."""
    alone = sum(b.start.shape == a.start.shape for b in actors) == 1
    return a.start.shape if alone else a.start.name


def _question(kind: str, actors: list[Actor], frames: int, rng: random.Random) -> QA | None:
    """One question of `kind` about the clip, or None when the clip cannot pose one."""
    if kind == "direction":  # objects shown in every frame: did it move, and which way
        a = _lean(rng, [a for a in actors if a.event == "moves"], [a for a in actors if a.event in ("still", "turns")])
        return a and QA(f"which way did the {_named(actors, a)} move?", a.direction or STILL, kind)
    if kind == "order":
        appeared = [a for a in actors if a.event == "appears"]
        return QA("what appeared?", f"the {appeared[0].start.name}", kind) if len(appeared) == 1 else None
    if kind == "frames":
        a = _lean(rng, [a for a in actors if a.event in ("appears", "disappears")], actors)
        return QA(f"how many frames show the {_named(actors, a)}?", str(sum(a.at(t) is not None for t in range(frames))), kind)
    unique = [a for a in actors if sum(b.start.shape == a.start.shape for b in actors) == 1]  # named by shape
    if kind == "color":
        a = _lean(rng, [], [a for a in unique if a.event != "appears"])
        return a and QA(f"what color is the {a.start.shape} at the start?", a.start.color, kind)
    if kind == "change":
        a = _lean(rng, [], [a for a in unique if a.event == "turns"])
        return a and QA(f"what color did the {a.start.shape} turn?", a.new_color, kind)
    raise ValueError(f"unknown question type {kind!r}")
