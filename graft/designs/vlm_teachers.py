"""The teachers of a distilled VLM (`model: vlm` with `distill.teachers`, graft/distill_lm.py): the
student model that hands the objectives its answer logits and hidden states, and the frozen teachers
the trainer holds.

A teacher is a graft VLM run with a complete checkpoint. It reads the student's batch as it is —
the same token ids, so it must share the student's tokenizer and give an image as many tokens — and
the student's pixels through `models.teachers.ImagesAs` (another image size, mean or std is adapted,
not refused). Its logits are compared over the shared vocabulary; its hidden states at the layers
`distill.layers` names, through a learned map on the student where the widths differ.
"""

from __future__ import annotations

import torch
from torch import nn

from graft.data.sources import source_kind
from graft.designs.dual_teachers import same_tokenizer
from graft.designs.registry import design
from graft.distill_lm import answer_positions, parse_layers
from graft.errors import UserError
from graft.models.modality import TIME_SERIES
from graft.models.teachers import ImagesAs
from graft.models.vlm import VLM
from graft.objectives import Teacher
from graft.rundir import RunDir
from graft.trainer.checkpoint import load_weights


class DistilledVLM(VLM):
    """A VLM taught by frozen VLMs. In training its forward also returns, for the objectives,
    `{"logits": (answer positions, V), "hidden": per teacher, per layer pair (real tokens, D_teacher)}`
    (the student's states through a linear map to each teacher's width where it differs; saved with
    the student)."""

    def __init__(self, *args, pairs: list[tuple[int, int]], teacher_widths: list[int], pad: int, **kwargs):
        super().__init__(*args, **kwargs)
        own, self.pairs, self.pad = self.lm.hidden_size, pairs, pad
        self.distill_proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(own, d, bias=False) if d != own else nn.Identity() for _ in pairs)
            for d in teacher_widths)

    def forward(self, input_ids, pixel_values=None, labels=None, cache=None, image_tokens=None, answers_only=False,
                **rows):
        if labels is None:
            return super().forward(input_ids, pixel_values, labels, cache, image_tokens, **rows)
        hidden = {s: None for s, _ in self.pairs}
        logits, losses = super().forward(input_ids, pixel_values, labels, cache, image_tokens, hidden=hidden, **rows)
        real = input_ids != self.pad
        states = [[proj(hidden[s][real]) for proj, (s, _) in zip(projs, self.pairs)] for projs in self.distill_proj]
        return {"logits": logits[answer_positions(labels)], "hidden": states}, losses


def load(paths: list[str], cfg, tok, build) -> list[tuple[nn.Module, ImagesAs]]:
    """Each teacher run's model (its latest weights, eval mode) and how it reads the student's pixels
    (a series teacher reads the student's recordings as they are: `check_modality`)."""
    teachers = []
    for path in paths:
        run = RunDir(path).require()
        theirs = run.config()
        model = build(theirs, tok, pretrained=False)
        load_weights(model, run.latest_checkpoint())
        v, w = theirs.vision, cfg.vision
        teachers.append((model, ImagesAs((v.image_size, list(v.image_mean), list(v.image_std)),
                                         (w.image_size, list(w.image_mean), list(w.image_std)))))
    return teachers


def check_modality(path: str, theirs, cfg) -> None:
    """A teacher reads items of the student's modality; a series teacher, recordings of the student's
    channels and length (its own tower may patch them another way: a WRN teacher, a patch student)."""
    mine, its = source_kind(cfg).modality, source_kind(theirs).modality
    if mine is not its:
        raise UserError(f"distill.teachers: {path} reads {its.name} items (data.source={theirs.data.source}), this run "
                        f"reads {mine.name} items (data.source={cfg.data.source})")
    if mine is TIME_SERIES and (theirs.series.channels, theirs.series.length) != (cfg.series.channels, cfg.series.length):
        raise UserError(f"distill.teachers: {path} reads recordings of series.channels={theirs.series.channels}, "
                        f"series.length={theirs.series.length}; this run's are {cfg.series.channels}, {cfg.series.length}")


def check_teachers(cfg, tok, student_tokens: int, teachers: list[tuple[nn.Module, ImagesAs]]) -> list[int]:
    """The teachers' widths, after checking that each reads the student's rows (one line each otherwise)."""
    widths = []
    for path, (model, _) in zip(cfg.distill.paths, teachers):
        if model.num_image_tokens != student_tokens:
            raise UserError(f"distill.teachers: {path} gives an image {model.num_image_tokens} tokens, this run "
                            f"{student_tokens}; a VLM teacher reads the student's token ids")
        layers = len(model.lm.layers)
        for s, t in cfg.distill.layers.items():
            if not -layers <= t < layers:
                raise UserError(f"distill.layers: {{{s}: {t}}}: the teacher {path} has {layers} layers")
        widths.append(model.lm.hidden_size)
    return widths


def teacher_pairs(cfg) -> list[tuple[int, int]]:
    return parse_layers(cfg.distill.layers, cfg.lm.layers, "distill.layers")


def teacher(cfg, model, tok, build) -> Teacher | None:
    """The frozen teachers, each reading the student's batch into (logits at answer positions,
    [hidden states at real tokens per layer pair]); loading them leaves the global RNG alone."""
    if not cfg.distill.teachers:
        return None
    for path in cfg.distill.paths:
        if not same_tokenizer(tok, RunDir(path).tokenizer()):
            raise UserError(f"distill.teachers: {path} has another tokenizer; a VLM teacher reads the student's "
                            "token ids and its logits are over the student's vocabulary")
    with torch.random.fork_rng():
        loaded = load(cfg.distill.paths, cfg, tok, build)
    check_teachers(cfg, tok, model.num_image_tokens, loaded)
    modules = nn.ModuleList(nn.ModuleList([m, images]) for m, images in loaded)
    pairs, pad = model.pairs, tok.pad
    fixed = [RunDir(path).config().series.one_length() for path in cfg.distill.paths]  # WRN: one length

    def items_for(k: int, m, rows: dict) -> dict:
        """The rows as teacher k reads them: a one-length tower gets no per-item counts (every item full)."""
        counts = rows.get(TIME_SERIES.counts)
        if not fixed[k] or counts is None:
            return rows
        if not bool((counts == m.num_image_tokens).all()):
            raise UserError(f"distill.teachers: {cfg.distill.paths[k]} reads recordings of one length ({fixed[k]}); "
                            "this batch has shorter ones")
        return {key: v for key, v in rows.items() if key != TIME_SERIES.counts}

    def read(teachers, batch):
        at, real = answer_positions(batch["labels"]), batch["input_ids"] != pad
        rows = {k: v for k, v in batch.items() if k not in ("labels", "pixel_values")}
        out = []
        for k, (m, images) in enumerate(teachers):
            hidden = {t % len(m.lm.layers): None for _, t in pairs}
            items = {"pixel_values": images(batch["pixel_values"])} if "pixel_values" in batch else {}  # series: in rows
            logits, _ = m(hidden=hidden, **items, **items_for(k, m, rows))
            out.append((logits[at], [hidden[t % len(m.lm.layers)][real] for _, t in pairs]))
        return out

    return Teacher(modules, read)


def check_sources(cfg, build) -> None:
    """Each `distill.teachers` entry is a graft run of this design (`build`) with a complete
    checkpoint (its tokenizer, image tokens and layers are checked when it is loaded)."""
    for path in cfg.distill.paths:
        run = RunDir(path).require()
        theirs = run.config()
        if design(theirs.model).build is not build:
            raise UserError(f"distill.teachers: {path} is a model={theirs.model} run, not a VLM (model=vlm)")
        if run.latest_checkpoint() is None:
            raise UserError(f"distill.teachers: {path} has no complete checkpoint")
        check_modality(path, theirs, cfg)
