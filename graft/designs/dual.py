"""Dual encoders (CLIP, SigLIP, CLIPPO, LiT): an image tower and a text tower (or one tower for
both, CLIPPO) trained with a contrastive loss. Its token count serves the other design that embeds
(qformer_stage1). On a source of series (data.source=sensors, ts, ...) the series tower
(models/series.py, section `series`) takes the ViT's place: series–text pairs, each recording with its
caption. With `distill.teachers` (CLIP-KD, graft/distill.py) the trainer
also holds frozen dual-encoder teachers (graft runs or HF CLIP/SigLIP folders: dual_teachers.py)
and adds the losses `distill_*` (`objectives`)."""

from __future__ import annotations

from torch import nn

from graft import distill
from graft.data.contrastive import ContrastiveProcessor, SeriesPairProcessor
from graft.data.sources import source_kind
from graft.designs.dual_teachers import check_sources, embed_dims, patch_dims, teacher
from graft.designs.registry import EMBEDS, Design, register
from graft.designs.shared import check_tower_sections, validate_vision
from graft.errors import UserError
from graft.models.dual_encoder import PARTS, ContrastiveConfig, DualEncoder
from graft.models.mim import PatchMasker
from graft.models.modality import IMAGES, TIME_SERIES
from graft.models.series import SeriesConfig, series_tower
from graft.models.text_encoder import TextConfig


class DistilledDualEncoder(DualEncoder):
    """A dual encoder taught by frozen dual encoders: its forward also hands the objectives its
    embeddings, its scale and, per teacher, its embeddings mapped to that teacher's width (a learned
    linear map where the widths differ, CLIP-KD §3.2; saved with the student)."""

    def __init__(self, *args, teacher_dims: list[int], project: bool, patch_dims: list[int] | None = None,
                 masked_dims: list[int] | None = None, mask_prob: float = 0.0):
        super().__init__(*args)
        own = self.cfg.embed_dim
        self.distill_proj = nn.ModuleList(nn.Linear(own, d, bias=False) if project and d != own else nn.Identity()
                                          for d in teacher_dims)
        width = self.vision.cfg.hidden_size  # `dense`: RADIO's per-teacher MLP heads on the patch tokens

        def heads(dims):
            return nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, d)) for d in dims or [])

        self.dense_heads = heads(patch_dims)
        self.masked_heads = heads(masked_dims)  # `masked`: per-teacher heads on the masked image's states
        self.masker = PatchMasker(self.vision, mask_prob) if masked_dims else None

    def forward(self, pixel_values=None, input_ids=None, text_pixels=None, **items):
        (image, text), losses, patches = self.forward_patches(pixel_values, input_ids, text_pixels, **items)
        out = {"image": image, "text": text, "scale": self.logit_scale.exp().clamp(max=100.0),  # (B, E) each
               "projected": [(p(image), p(text)) for p in self.distill_proj],
               "dense": [head(patches) for head in self.dense_heads]}
        if self.masker is not None:  # a second pass of the image tower, over the masked image
            out["mask"] = self.masker.mask(pixel_values)
            states = self.masker.states(self.vision, pixel_values, out["mask"])[out["mask"]]  # (M, D)
            out["masked"] = [head(states) for head in self.masked_heads]
        return out, losses


def build(cfg, tok, pretrained: bool = True):
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tok)  # resolved here and saved with the config
    elif cfg.text.vocab_size < len(tok):
        raise UserError(f"text.vocab_size={cfg.text.vocab_size} is smaller than the tokenizer's {len(tok)}")
    if series(cfg):
        return DualEncoder(series_tower(cfg.series), cfg.text, cfg.contrastive, tok.eos, TIME_SERIES, tok.pad, special(tok))
    if not cfg.distill.teachers:
        return DualEncoder(cfg.vision, cfg.text, cfg.contrastive, tok.eos, pad_id=tok.pad, special=special(tok))
    dims = embed_dims(cfg, tok)
    project = bool({"fd", "icl"} & set(cfg.distill.chosen(distill.DEFAULT)))  # crd compares within each model's own space
    dense = patch_dims(cfg) if "dense" in cfg.distill.losses else None
    masked = patch_dims(cfg) if "masked" in cfg.distill.losses else None
    return DistilledDualEncoder(cfg.vision, cfg.text, cfg.contrastive, tok.eos, IMAGES, tok.pad, special(tok),
                                teacher_dims=dims, project=project, patch_dims=dense, masked_dims=masked,
                                mask_prob=cfg.distill.mask_prob)


def special(tok) -> tuple[int, ...]:
    """The token ids masked language modelling never chooses."""
    return tok.pad, tok.bos, tok.eos


def config_losses(cfg) -> tuple[str, ...]:
    c = cfg.contrastive
    own = (("itm",) if c.itm_layers else ()) + (("mlm",) if c.mlm_prob else ()) + (("mim",) if c.mim_prob else ())
    return own + distill.loss_names(cfg.distill)


def objectives(cfg, model) -> dict:
    return distill.objectives(cfg.distill, cfg.vision.image_size // cfg.vision.patch_size)


def sources(cfg) -> None:
    check_sources(cfg, build)


def series(cfg) -> bool:
    return source_kind(cfg).modality is TIME_SERIES


def processor(cfg, tok, model):
    if series(cfg):
        return SeriesPairProcessor(tok, cfg.series, cfg.text.max_len, cfg.series.one_length())
    c = cfg.contrastive
    return ContrastiveProcessor(tok, cfg.vision.image_size, cfg.text.max_len, c.shared_tower, c.render_font_size)


def tokens(batch, pad: int) -> int:
    ids = batch.get("input_ids")  # CLIPPO batches carry rendered text, no token ids
    return 0 if ids is None else int((ids != pad).sum())


def validate(cfg) -> None:
    TextConfig.check(cfg.text)
    ContrastiveConfig.check(cfg.contrastive)
    check_tower_sections(cfg)
    if series(cfg):
        SeriesConfig.check(cfg.series)
        for key, why in (("contrastive.shared_tower", "CLIPPO renders the text as an image for the one image tower"),
                         ("distill.teachers", "the teachers embed images"),
                         ("contrastive.itm_layers", "image–text matching reads image patches"),
                         ("contrastive.mim_prob", "masked image modelling masks image patches")):
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name):
                raise UserError(f"{key} is not available with series data (data.source={cfg.data.source}): {why}")
    else:
        validate_vision(cfg)
    if cfg.distill.layers:
        raise UserError(f"distill.layers={cfg.distill.layers}: a dual encoder's distillation has no hidden loss (model=vlm has)")
    if cfg.eval.itm_rerank and not cfg.contrastive.itm_layers:
        raise UserError(f"eval.itm_rerank={cfg.eval.itm_rerank} re-ranks by image–text matching; this dual encoder has "
                        "none (contrastive.itm_layers=0)")
    distill.DistillConfig.check(cfg.distill)
    for key, on in (("contrastive.mim_prob", cfg.contrastive.mim_prob), ("distill.losses=[masked]", "masked" in cfg.distill.losses)):
        if on and cfg.vision.hf_path:
            raise UserError(f"{key}: masked image modelling masks the built-in ViT's patches; "
                            f"vision.hf_path={cfg.vision.hf_path} is an HF tower")
    if cfg.contrastive.mlm_prob and cfg.text.causal:
        raise UserError(f"contrastive.mlm_prob={cfg.contrastive.mlm_prob}: masked language modelling needs a "
                        "bidirectional text tower (text.causal=false, as siglip's)")
    if cfg.contrastive.shared_tower and "text" in cfg.train.freeze:
        raise UserError("train.freeze: 'text' has no tower of its own when contrastive.shared_tower=true (CLIPPO)")


register("dual", Design(frozenset({EMBEDS}), ("vision", "text", "contrastive", "distill", "series"), PARTS, build, processor,
                        tokens, validate, losses=("itc",), sources=sources,
                        config_losses=config_losses, teacher=teacher,
                        objectives=objectives, config_sections={"text": TextConfig, "contrastive": ContrastiveConfig,
                                                                "distill": distill.DistillConfig, "series": SeriesConfig},
                        modalities=frozenset({IMAGES.name, TIME_SERIES.name})))
