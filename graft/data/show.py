"""`graft data show RECIPE`: a PNG grid of the first usable records of a recipe's data, with their text.

The records are the ones training would read first, read through the recipe's processor as
training reads them (`streaming.read_record`), bad ones skipped and counted (`graft data check`):
the built-in world's samples with the turns training gives them (a dual encoder: the caption;
`--split` shows a held-out split), or the user's sources; a record of several images (a clip's
frames, a document) is drawn as a strip of them, in order. Under each image: a VLM
recipe's first turns (question → answer), a dual encoder's caption. With a trained VLM run, each
shown question is also put to the model, and its answer is drawn under the reference, green when
it matches after `vqa.normalise`, red when not (the model reads every image of the record).

Text from data is untrusted: it is escaped (`skips.printable`), cut to the cell's lines and drawn
with mathtext off, so a caption holding `$`, control characters or megabytes draws as plain text.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from graft import atomic
from graft.build import build_processor, load_run
from graft.config import Config
from graft.data import skips
from graft.data.check import processor_for
from graft.data.limits import bounded_turns
from graft.data.samples import BadSample
from graft.data.sources import build_sources, source_kind
from graft.data.streaming import StreamDataset, fresh_position, read_record
from graft.designs import GENERATES, design
from graft.errors import UserError
from graft.eval.vqa import answer, normalise
from graft.report import png_bytes, pyplot
from graft.rundir import RunDir

MAX_SAMPLES = 64  # one figure; beyond this the PNG gets unwieldy
MAX_READ = 10_000  # records read at most while looking for usable ones
TURNS = 3  # conversation turns drawn per image
STRIP = 4  # images of one record drawn side by side (a clip's frames)
# Layout at DPI: 4 columns of 250 px (1000 px, a README's width), images 192 px high (24 px x 8, 32 px x 6),
# 42 characters to a text line.
DPI, COLS, CELL_W, IMAGE_H, FONT, WRAP = 100, 4, 2.5, 1.92, 7.5, 42
LINE_H = FONT * 1.3 / 72  # inches
RIGHT, WRONG, KEY = "#1a7f37", "#cf222e", "#6e7781"


@dataclass
class Record:
    key: str
    image: Image.Image  # what is drawn: the item, or a record's images side by side (a clip's frames)
    turns: list[tuple[str, str]]  # (question, answer); a dual encoder pairs the image with turns[0][1]
    answers: list[str | None] = field(default_factory=list)  # the model's, per shown turn (--run)
    items: list = field(default_factory=list)  # what the model reads (--run): every image of the record


@dataclass
class Shown:
    path: Path
    texts: list[str]  # the text drawn under each image, as drawn
    skipped: Counter  # reason → records (and shard_* → shards)
    right: int = 0
    asked: int = 0

    def line(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        model = f"; model right on {self.right} of {self.asked} answers" if self.asked else ""
        return (f"graft data show: {len(self.texts)} samples drawn; skipped: {skipped or 'none'}"
                f"{model}; wrote {self.path}")


def show(cfg: Config, n: int, out: str | Path, run: str | None = None, split: str = "train") -> Shown:
    """Draw the first `n` usable records of `cfg`'s data to the PNG `out` (with `run`'s answers);
    `split`: which of the built-in world's splits (held-out ones show what a run has not seen)."""
    out = _check_out(n, Path(out))
    splits = source_kind(cfg).splits
    if split not in splits:
        raise UserError(f"--split {split!r}: not a split of data.source={cfg.data.source} ({', '.join(splits)})" if
                        len(splits) > 1 else f"--split {split}: splits are the built-in world's; data.source="
                        f"{cfg.data.source} is shown as it trains")
    vlm = _load_vlm(run, cfg) if run else None
    records, skipped = stream_records(cfg, n, split)
    if not records:
        raise UserError(f"no usable record in {cfg.name}'s data (data.source={cfg.data.source}); "
                        f"skipped: {', '.join(f'{k} {r}' for r, k in skipped.items()) or 'none'}")
    if vlm:
        ask(*vlm, records)
    cells = [cell_lines(r, dual=not design(cfg.model).can(GENERATES)) for r in records]
    atomic.write_bytes(out, draw(records, cells))
    marks = [_right(a, ref) for r in records for a, (_, ref) in zip(r.answers, r.turns) if a is not None]
    return Shown(out, ["\n".join(text for text, _ in lines) for lines in cells], skipped, sum(marks), len(marks))


def _check_out(n: int, out: Path) -> Path:
    if not 1 <= n <= MAX_SAMPLES:
        raise UserError(f"--n={n}: draw 1 to {MAX_SAMPLES} samples")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the picture is a PNG, name it FILE.png")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder")
    return out


def _load_vlm(path: str, cfg: Config):
    run = RunDir(path).require()
    kind = run.config().model
    if not design(kind).can(GENERATES):
        raise UserError(f"--run {path} holds a {kind} model, which does not answer questions (--run takes a VLM run)")
    if not design(cfg.model).can(GENERATES):
        raise UserError(f"--run asks a VLM the records' questions; recipe {cfg.name} is a {cfg.model} model "
                        "(show its data with a VLM recipe and the same --set data.* keys)")
    run_cfg, tok, model, _ = load_run(run)
    return model, build_processor(run_cfg, tok, model), run_cfg


def stream_records(cfg: Config, n: int, split: str = "train") -> tuple[list[Record], Counter]:
    """The first `n` usable records of the recipe's sources (one pass, at most MAX_READ records), each
    checked by exactly what training runs (`streaming.read_record`); the rest skipped and counted."""
    proc = processor_for(cfg)
    sources, weights = build_sources(cfg, proc, split)
    ds = StreamDataset(sources, weights, proc, cfg.data, 1, 0, 1, 1, {}, 0)
    log, records = skips.SkipLog(), []
    for i, raw in islice(ds.records(0, 1, fresh_position(len(sources)), log, epochs=1), MAX_READ):
        source = sources[i]
        try:
            read_record(proc, cfg.data, source, raw)  # every check training makes; then the parts to draw
            example = source.example(raw)
            turns, _ = bounded_turns(example.turns, cfg.data)
            # a text-only record (data.text_only) draws blank
            items = [proc.open(item, cfg.data)[0] for item in example.images] or [_blank(proc.image_size)]
        except BadSample as e:
            log.skip(e.reason, source.key(raw), e.detail)
            continue
        records.append(Record(source.key(raw), strip(items), turns, items=items if example.images else []))
        if len(records) == n:
            break
    return records, log.skipped


def strip(items: list) -> Image.Image | np.ndarray:
    """One item as it is; several images side by side, in order, at the first one's height, with a
    light gap (a clip's frames, a document's images): at most STRIP of them."""
    if len(items) == 1 or not all(isinstance(x, Image.Image) for x in items):
        return items[0]
    shown = [x.convert("RGB") for x in items[:STRIP]]
    h = shown[0].height
    shown = [x if x.height == h else x.resize((max(1, round(x.width * h / x.height)), h)) for x in shown]
    gap = max(1, h // 12)
    out = Image.new("RGB", (sum(x.width for x in shown) + gap * (len(shown) - 1), h), (200, 200, 200))
    left = 0
    for x in shown:
        out.paste(x, (left, 0))
        left += x.width + gap
    return out


def _blank(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (128, 128, 128))


def ask(model, proc, run_cfg: Config, records: list[Record]) -> None:
    """Each record's shown questions, answered greedily by the model (one turn each, image resized by
    the processor); a question the processor cannot encode gets None."""
    prompts, where = [], []
    for r in records:
        r.answers = [None] * min(TURNS, len(r.turns))
        for t, (question, _) in enumerate(r.turns[:TURNS]):
            try:
                proc.prompt(question)
            except BadSample:
                continue
            prompts.append((r.items or [r.image], question))
            where.append((r, t))
    e = run_cfg.eval
    for (r, t), text in zip(where, answer(model, proc, prompts, e.batch_size, e.max_new_tokens)):
        r.answers[t] = text


def cell_lines(r: Record, dual: bool) -> list[tuple[str, str]]:
    """(text, colour) lines under one image: the record's key, then its caption (dual) or its first
    TURNS turns, each with the model's answer when asked; escaped, wrapped, each part cut short."""
    lines = [(_trim(r.key, WRAP), KEY)]
    if dual:
        return lines + _wrap(r.turns[0][1], "black", 4)
    for t, (question, reference) in enumerate(r.turns[:TURNS]):
        lines += _wrap("Q: " + question, "black", 2) + _wrap("A: " + reference, "black", 3)
        if t < len(r.answers):
            lines += _model_lines(r.answers[t], reference)
    if len(r.turns) > TURNS:
        lines.append((f"(+{len(r.turns) - TURNS} more turns)", KEY))
    return lines


def _model_lines(got: str | None, reference: str) -> list[tuple[str, str]]:
    if got is None:
        return [("model: (question not encodable)", WRONG)]
    ok = _right(got, reference)
    lines = _wrap("model: " + (got.strip() or "(empty)"), RIGHT if ok else WRONG, 3)
    lines[-1] = (lines[-1][0] + (" ✓" if ok else " ✗"), lines[-1][1])  # after escaping: the mark is ours
    return lines


def _right(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def _trim(text: str, width: int) -> str:
    """The last `width` characters of an escaped key (its record id, not its folder)."""
    text = skips.printable(text, limit=10_000)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _wrap(text: str, colour: str, max_lines: int) -> list[tuple[str, str]]:
    text = skips.printable(text, limit=WRAP * max_lines + 3)
    lines = textwrap.wrap(text, WRAP) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: WRAP - 3] + "..."
    return [(line, colour) for line in lines]


def draw(records: list[Record], cells: list[list[tuple[str, str]]]) -> bytes:
    """A grid of COLS columns, each image over its lines; a row is as tall as its tallest image (a
    strip of frames is wide and low) and its longest text. Returns the PNG's bytes."""
    cols = min(COLS, len(records))
    rows = range(0, len(records), cols)
    text_hs = [max(len(lines) for lines in cells[i : i + cols]) * LINE_H + 0.1 for i in rows]  # inches
    image_hs = [max(_height(r.image) for r in records[i : i + cols]) for i in rows]
    W, H = cols * CELL_W, sum(h + 0.1 for h in image_hs) + sum(text_hs)
    fig = pyplot().figure(figsize=(W, H), dpi=DPI)
    top = H
    for first, text_h, image_h in zip(rows, text_hs, image_hs):
        for k in range(first, min(first + cols, len(records))):
            x = (k - first) * CELL_W + 0.08  # inches from the left; `top` from the bottom
            image = fig.add_axes((x / W, (top - 0.05 - image_h) / H, (CELL_W - 0.1) / W, image_h / H))
            text = fig.add_axes((x / W, (top - image_h - 0.1 - text_h) / H, (CELL_W - 0.16) / W, text_h / H))
            _draw_cell(image, text, records[k].image, cells[k], text_h)
        top -= image_h + 0.1 + text_h
    return png_bytes(fig, DPI)


def _height(image) -> float:
    """Inches an image takes fitted into a cell (at most IMAGE_H); a series plot takes IMAGE_H."""
    if isinstance(image, np.ndarray):
        return IMAGE_H
    return min(IMAGE_H, (CELL_W - 0.1) * image.height / image.width)


def _draw_cell(image_ax, text_ax, image, lines: list[tuple[str, str]], text_h: float) -> None:
    """An image, or a series (C, L) as one line per channel over its lines of text."""
    if isinstance(image, np.ndarray):
        image_ax.plot(image.T, linewidth=0.6)
        image_ax.set_xticks([]), image_ax.set_yticks([])
    else:
        pos, fig = image_ax.get_position(), image_ax.figure
        box = (round(pos.width * fig.get_figwidth() * DPI), round(pos.height * fig.get_figheight() * DPI))
        image_ax.imshow(_scaled(image, box), interpolation="nearest")
        image_ax.set_anchor("SW")  # flush left, just over its text
        image_ax.set_axis_off()
    text_ax.set_axis_off()
    for j, (text, colour) in enumerate(lines):  # data text: no mathtext, clipped to the cell
        text_ax.text(0, 1 - j * LINE_H / text_h, text, color=colour, fontsize=FONT, va="top", ha="left",
                     transform=text_ax.transAxes, clip_on=True, parse_math=False, usetex=False)


def _scaled(img: Image.Image, box: tuple[int, int]) -> Image.Image:
    """`img` fitted into `box` (w, h) pixels: blocky when enlarged, so a 24 px image stays readable."""
    img = img.convert("RGB")
    scale = min(box[0] / img.width, box[1] / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST if scale > 1 else Image.BOX)
