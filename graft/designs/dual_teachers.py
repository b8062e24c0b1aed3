"""The teachers of a distilled dual encoder (`distill.teachers`, graft/distill.py): what each
entry is, what it needs of the student, and the frozen modules the trainer holds.

An entry is a graft dual-encoder run, or a Hugging Face CLIP or SigLIP model folder (config.json,
weights and tokenizer: a released model, e.g. `openai/clip-vit-base-patch32` saved to disk), or a
vision model alone for the patch losses (a CLIP or SigLIP tower, `facebook/dinov2-small`). Both
read the student's pixels through `models.teachers.ImagesAs` (another image size, mean or std is
adapted, not refused). A graft run reads the student's token ids, so it must share the student's
tokenizer; an HF model decodes them to text and encodes it with its own tokenizer, which rendered
text (CLIPPO) does not allow.
"""

from __future__ import annotations

import torch
from torch import nn

from graft import distill, teacher_store
from graft.designs.registry import design
from graft.errors import UserError
from graft.models.dual_encoder import DualEncoder
from graft.models.hf_backbones import resolve_vision
from graft.models.teachers import (DINO_KINDS, HF_VISION_KINDS, Adapted, HFDualTeacher, HFVisionTeacher, ImagesAs,
                                   dino_images, hf_embed_dim, hf_kind, hf_patch_dim)
from graft.models.vit import VisionConfig
from graft.objectives import Teacher
from graft.rundir import RunDir
from graft.trainer.checkpoint import read_model


def embed_dims(cfg, tok) -> list[int]:
    """Each teacher's embedding width (what the student's projections map to)."""
    dims = []
    for path in cfg.distill.paths:
        if (kind := hf_kind(path)) in HF_VISION_KINDS:
            dims.append(0)  # a tower alone has no embedding space (check_sources: patch losses only)
            continue
        if kind:
            dims.append(hf_embed_dim(path))
            continue
        run = RunDir(path).require()
        if not same_tokenizer(tok, run.tokenizer()):
            raise UserError(f"distill.teachers: {path} has another tokenizer (vocab {len(run.tokenizer())}, this "
                            f"run's {len(tok)}); a graft teacher reads the student's token ids")
        dims.append(run.config().contrastive.embed_dim)
    return dims


def patch_dims(cfg) -> list[int]:
    """Each teacher's patch-feature width (what the student's dense heads map to)."""
    return [hf_patch_dim(path) if hf_kind(path) else RunDir(path).config().vision.hidden_size
            for path in cfg.distill.paths]


def same_tokenizer(tok, theirs) -> bool:
    if len(tok) != len(theirs):
        return False
    mine, its = getattr(tok, "tok", None), getattr(theirs, "tok", None)  # built-in tokenizers: their files
    return mine is None or its is None or mine.to_str() == its.to_str()


def teacher(cfg, model, tok) -> Teacher | None:
    """The frozen teachers (a ModuleList), each reading the student's pixels and text into its
    normalised (image, text) embeddings, its logit scale and (for `dense`) its patch features;
    loading them leaves the global RNG alone."""
    if not cfg.distill.teachers:
        return None
    if cfg.distill.precomputed:  # read by record, the teachers not loaded (graft/teacher_store.py)
        return teacher_store.stored_teacher(cfg.distill.precomputed, check_store(cfg), cfg.distill.paths)
    with torch.random.fork_rng():
        teachers = nn.ModuleList(_load(path, cfg, tok) for path in cfg.distill.paths)

    chosen = set(cfg.distill.chosen(distill.DEFAULT))
    dense = bool(set(distill.PATCH_LOSSES) & chosen)  # the teachers' patch features are read
    embeds = bool(chosen - set(distill.PATCH_LOSSES))  # and their embeddings and scale

    def read(teachers, batch):
        ids, text_pixels, pixels = batch.get("input_ids"), batch.get("text_pixels"), batch["pixel_values"]
        return [(t.encode_image(pixels) if embeds else None, t.encode_text(ids, text_pixels) if embeds else None,
                 t.scale().reshape(()) if embeds else None,  # scale: 0-d
                 t.patch_features(pixels) if dense else None) for t in teachers]

    return Teacher(teachers, read)


def check_store(cfg) -> dict:
    """`distill.precomputed`: written by this run's teachers over its data, with patch features if
    `dense` reads them; its manifest."""
    path = cfg.distill.precomputed
    m = teacher_store.manifest(path)
    teacher_store.check(cfg, m, path)
    patches = set(distill.PATCH_LOSSES) & set(cfg.distill.losses)
    if patches and any(outputs[3] == "none" for outputs in m["outputs"]):  # (img, txt, scale, patches)
        raise UserError(f"distill.precomputed: {path} holds no patch features for {', '.join(sorted(patches))} "
                        f"(distill.losses there: {m['losses'] or 'the default'})")
    return m


def _images(v: VisionConfig) -> tuple[int, list[float], list[float]]:
    """How a tower reads images: (size, mean, std)."""
    return v.image_size, list(v.image_mean), list(v.image_std)


def _load(path: str, cfg, tok) -> nn.Module:
    if kind := hf_kind(path):  # its image processor's size, mean and std
        theirs = dino_images(path) if kind in DINO_KINDS else _images(resolve_vision(VisionConfig(hf_path=path)))
        images = ImagesAs(theirs, _images(cfg.vision))
        return HFVisionTeacher(path, images) if kind in HF_VISION_KINDS else HFDualTeacher(path, tok.decode, images)
    run = RunDir(path).require()
    theirs, their_tok = run.config(), run.tokenizer()
    theirs.text.vocab_size = theirs.text.vocab_size or len(their_tok)  # 0 in its config: its tokenizer's (build)
    model = DualEncoder(theirs.vision, theirs.text, theirs.contrastive, their_tok.eos)
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise UserError(f"distill.teachers: {path} has no complete checkpoint")
    # every tensor of its own, its logit scale included (kd reads it), read once; a teacher that was
    # itself distilled also holds projections to its teachers, which are not needed here
    missing, _ = model.load_state_dict(read_model(ckpt), strict=False)
    if missing:
        raise UserError(f"distill.teachers: {ckpt} holds no {', '.join(missing[:3])}")
    return Adapted(model, ImagesAs(_images(theirs.vision), _images(cfg.vision)))


def check_sources(cfg, build) -> None:
    """Each `distill.teachers` entry is an HF CLIP/SigLIP folder (and the student's text is token ids)
    or a graft run of the dual design (`build`) with a complete checkpoint whose towers read text as
    the student's do (images of another size, mean or std are adapted)."""
    for path in cfg.distill.paths:
        if (kind := hf_kind(path)) in HF_VISION_KINDS:
            other = sorted(set(cfg.distill.chosen(distill.DEFAULT)) - set(distill.PATCH_LOSSES))
            if other:
                raise UserError(f"distill.teachers: {path} is an HF vision tower alone: it gives patch features, for "
                                f"{' and '.join(distill.PATCH_LOSSES)} only, not {', '.join(other)} (distill.losses)")
            continue
        if kind:
            if cfg.contrastive.shared_tower:
                raise UserError(f"distill.teachers: {path} is an HF model, which reads text as token ids; this run's "
                                "text is rendered as images (contrastive.shared_tower=true, CLIPPO)")
            continue
        theirs = RunDir(path).require().config()
        if design(theirs.model).build is not build:  # a run of this design, whatever it is registered as
            raise UserError(f"distill.teachers: {path} is a model={theirs.model} run, not a dual encoder")
        if RunDir(path).latest_checkpoint() is None:
            raise UserError(f"distill.teachers: {path} has no complete checkpoint")
        if theirs.contrastive.shared_tower != cfg.contrastive.shared_tower or theirs.text.max_len < cfg.text.max_len:
            raise UserError(f"distill.teachers: {path} reads text another way (contrastive.shared_tower="
                            f"{theirs.contrastive.shared_tower}, text.max_len={theirs.text.max_len}; this run's "
                            f"{cfg.contrastive.shared_tower}, {cfg.text.max_len})")
    if cfg.distill.precomputed:
        check_store(cfg)
