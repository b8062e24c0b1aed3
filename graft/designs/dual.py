"""Dual encoders (CLIP, SigLIP, CLIPPO, LiT): an image tower and a text tower (or one tower for
both, CLIPPO) trained with a contrastive loss. Its world batches and token count serve the other
design that embeds (qformer_stage1). With `distill.teachers` (CLIP-KD, graft/distill.py) the trainer
also holds frozen dual-encoder teachers (`teacher`) and adds the losses `distill_*` (`objectives`)."""

from __future__ import annotations

import torch
from torch import nn

from graft import distill
from graft.data.contrastive import ContrastiveProcessor
from graft.designs.registry import EMBEDS, Design, design, register
from graft.designs.shared import validate_vision
from graft.errors import UserError
from graft.models.dual_encoder import PARTS, ContrastiveConfig, DualEncoder
from graft.models.text_encoder import TextConfig
from graft.objectives import Teacher
from graft.parts import load_modules
from graft.rundir import RunDir


class DistilledDualEncoder(DualEncoder):
    """A dual encoder taught by frozen dual encoders: its forward also hands the objectives its
    embeddings, its scale and, per teacher, its embeddings mapped to that teacher's width (a learned
    linear map where the widths differ, CLIP-KD §3.2; saved with the student)."""

    def __init__(self, *args, teacher_dims: list[int], project: bool):
        super().__init__(*args)
        own = self.cfg.embed_dim
        self.distill_proj = nn.ModuleList(nn.Linear(own, d, bias=False) if project and d != own else nn.Identity()
                                          for d in teacher_dims)

    def forward(self, pixel_values, input_ids=None, text_pixels=None):
        (image, text), losses = super().forward(pixel_values, input_ids, text_pixels)
        return {"image": image, "text": text, "scale": self.logit_scale.exp().clamp(max=100.0),  # (B, E) each
                "projected": [(p(image), p(text)) for p in self.distill_proj]}, losses


def build(cfg, tok, pretrained: bool = True):
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.text.vocab_size < len(tok):
        raise UserError(f"text.vocab_size={cfg.text.vocab_size} is smaller than the tokenizer's {len(tok)}")
    if not cfg.distill.teachers:
        return DualEncoder(cfg.vision, cfg.text, cfg.contrastive, tok.eos)
    dims = []
    for path in cfg.distill.teachers:
        run = RunDir(path).require()
        theirs, their_tok = run.config(), run.tokenizer()
        if not _same_tokenizer(tok, their_tok):
            raise UserError(f"distill.teachers: {path} has another tokenizer (vocab {len(their_tok)}, this run's "
                            f"{len(tok)}); a teacher reads the student's token ids")
        dims.append(theirs.contrastive.embed_dim)
    project = bool({"fd", "icl"} & set(cfg.distill.losses))  # crd compares within each model's own space
    return DistilledDualEncoder(cfg.vision, cfg.text, cfg.contrastive, tok.eos, teacher_dims=dims, project=project)


def _same_tokenizer(tok, theirs) -> bool:
    if len(tok) != len(theirs):
        return False
    mine, its = getattr(tok, "tok", None), getattr(theirs, "tok", None)  # built-in tokenizers: their files
    return mine is None or its is None or mine.to_str() == its.to_str()


def teacher(cfg, model) -> Teacher | None:
    """The frozen teachers (a ModuleList), each reading the student's pixels and token ids into its
    normalised (image, text) embeddings; loading them leaves the global RNG alone."""
    if not cfg.distill.teachers:
        return None
    with torch.random.fork_rng():
        teachers = nn.ModuleList(_load_teacher(path) for path in cfg.distill.teachers)

    def read(teachers, batch):
        ids, text_pixels = batch.get("input_ids"), batch.get("text_pixels")
        return [(t.encode_image(batch["pixel_values"]), t.encode_text(ids, text_pixels)) for t in teachers]

    return Teacher(teachers, read)


def _load_teacher(path: str) -> DualEncoder:
    run = RunDir(path).require()
    theirs, tok = run.config(), run.tokenizer()
    theirs.text.vocab_size = theirs.text.vocab_size or len(tok)  # 0 in its config: its tokenizer's (build)
    model = DualEncoder(theirs.vision, theirs.text, theirs.contrastive, tok.eos)
    weighted = [name for part in PARTS for name in model.part_modules(part)
                if any(True for _ in model.get_submodule(name).parameters())]  # mean pooling has none
    load_modules(model, weighted, path, "distill.teachers")  # its scale is unused: crd has distill.temperature
    return model


def objectives(cfg, model) -> dict:
    return distill.objectives(cfg.distill)


def sources(cfg) -> None:
    """Each `distill.teachers` entry: a graft dual-encoder run with a complete checkpoint that reads
    the student's inputs as they are (the same image size, mean and std, text length and towers)."""
    v = cfg.vision
    for path in cfg.distill.teachers:
        theirs = RunDir(path).require().config()
        if design(theirs.model).build is not build:  # a run of this design, whatever it is registered as
            raise UserError(f"distill.teachers: {path} is a model={theirs.model} run, not a dual encoder")
        if RunDir(path).latest_checkpoint() is None:
            raise UserError(f"distill.teachers: {path} has no complete checkpoint")
        tv = theirs.vision
        if (tv.image_size, tv.image_mean, tv.image_std) != (v.image_size, v.image_mean, v.image_std):
            raise UserError(f"distill.teachers: {path} reads images of size {tv.image_size}, mean {tv.image_mean}, "
                            f"std {tv.image_std}; this run's are {v.image_size}, {v.image_mean}, {v.image_std}")
        if theirs.contrastive.shared_tower != cfg.contrastive.shared_tower or theirs.text.max_len < cfg.text.max_len:
            raise UserError(f"distill.teachers: {path} reads text another way (contrastive.shared_tower="
                            f"{theirs.contrastive.shared_tower}, text.max_len={theirs.text.max_len}; this run's "
                            f"{cfg.contrastive.shared_tower}, {cfg.text.max_len})")


def processor(cfg, tok, model):
    c = cfg.contrastive
    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.text.max_len, c.shared_tower, c.render_font_size)


def tokens(batch, pad: int) -> int:
    ids = batch.get("input_ids")  # CLIPPO batches carry rendered text, no token ids
    return 0 if ids is None else int((ids != pad).sum())


def validate(cfg) -> None:
    TextConfig.check(cfg.text)
    ContrastiveConfig.check(cfg.contrastive)
    validate_vision(cfg)
    distill.DistillConfig.check(cfg.distill)
    if cfg.contrastive.shared_tower and "text" in cfg.train.freeze:
        raise UserError("train.freeze: 'text' has no tower of its own when contrastive.shared_tower=true (CLIPPO)")


register("dual", Design(frozenset({EMBEDS}), ("vision", "text", "contrastive", "distill"), PARTS, build, processor,
                        tokens, validate, losses=("itc",), sources=sources,
                        config_losses=lambda cfg: distill.loss_names(cfg.distill), teacher=teacher,
                        objectives=objectives, config_sections={"text": TextConfig, "contrastive": ContrastiveConfig,
                                                                "distill": distill.DistillConfig}))
