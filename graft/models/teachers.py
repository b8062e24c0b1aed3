"""Frozen dual-encoder teachers that read a student's batch (CLIP-KD, graft/distill.py).

A teacher gives L2-normalised image and text embeddings for the student's own inputs, and its own
logit scale (`scale`):

- `ImagesAs`: the student's pixels as another model reads them: back to [0, 1] with the student's
  mean and std, resized to the teacher's image size (bicubic, antialiased, as image processors
  resample) and normalised with the teacher's mean and std. A teacher with the student's settings
  gets the pixels untouched.
- `HFDualTeacher`: a Hugging Face CLIP or SigLIP model folder (config.json, weights, tokenizer),
  as released models are shipped. `HFVisionTeacher`: a vision model alone (a CLIP or SigLIP
  tower, DINOv2 with or without registers): patch features only. Its text tower has its own tokenizer, so the student's token ids
  are decoded to text (`decode`: the student's tokenizer) and encoded again with the teacher's,
  padded as the model was trained (SigLIP: to its full length; CLIP: to the batch's longest).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import UserError

HF_KINDS = ("clip", "siglip")  # the `model_type`s of config.json taken as teachers
DINO_KINDS = ("dinov2", "dinov2_with_registers")  # self-supervised, no text: read at their processor's crop
HF_VISION_KINDS = ("clip_vision_model", "siglip_vision_model", *DINO_KINDS)  # towers alone: patch features only
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINOv2's image processor


class ImagesAs(nn.Module):
    """Pixels normalised one way (the student's mean and std) → as `size`, `mean`, `std` read them."""

    def __init__(self, theirs: tuple[int, list[float], list[float]], mine: tuple[int, list[float], list[float]]):
        super().__init__()
        self.size, self.same = theirs[0], theirs == mine
        for name, (_, mean, std) in (("mine", mine), ("theirs", theirs)):
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.same:
            return pixels
        x = pixels * self.mine_std + self.mine_mean  # [0, 1]
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return (x - self.theirs_mean) / self.theirs_std


class Adapted(nn.Module):
    """A graft dual encoder whose images are read through `ImagesAs`; its text ids are the student's."""

    def __init__(self, model: nn.Module, images: ImagesAs):
        super().__init__()
        self.model, self.images = model, images

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.images(pixels))

    def encode_text(self, ids, text_pixels=None) -> torch.Tensor:
        return self.model.encode_text(ids, text_pixels)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Its image tower's last layer at every patch (B, P, D)."""
        return self.model.vision(self.images(pixels))

    def scale(self) -> torch.Tensor:
        """Its own logit scale, exponentiated (clipped at 100 as in training)."""
        return self.model.logit_scale.exp().clamp(max=100.0)


def hf_kind(path: str) -> str | None:
    """"clip" or "siglip" for an HF model folder of that kind, None for a folder without config.json;
    another kind of HF folder is a UserError."""
    if not (Path(path) / "config.json").is_file():
        return None
    # lazy: imports transformers (~0.5 s), only for an HF teacher folder
    from transformers import AutoConfig

    kind = AutoConfig.from_pretrained(path).model_type
    if kind not in HF_KINDS + HF_VISION_KINDS:
        raise UserError(f"distill.teachers: {path} is an HF '{kind}' model; a teacher is a CLIP or SigLIP model "
                        f"({', '.join(HF_KINDS)}), a vision model alone for the patch losses "
                        f"({', '.join(HF_VISION_KINDS)}), or a graft dual-encoder run")
    return kind


def dino_images(path: str) -> tuple[int, list[float], list[float]]:
    """How a DINOv2 folder reads images, as its image processor does: (crop size, mean, std), 224
    and ImageNet's mean and std without a preprocessor_config.json. (Its config's image_size, 518
    in the released models, sizes only the position table, which the model interpolates.)"""
    pre = Path(path) / "preprocessor_config.json"
    data = {}
    if pre.is_file():
        try:
            data = json.loads(pre.read_text())
        except json.JSONDecodeError:
            raise UserError(f"distill.teachers: {pre} is not valid JSON") from None
    crop = data.get("crop_size") or {}
    size = crop.get("height", 224) if isinstance(crop, dict) else int(crop)
    return int(size), [float(v) for v in data.get("image_mean", IMAGENET_MEAN)], [float(v) for v in data.get("image_std", IMAGENET_STD)]


def hf_patch_dim(path: str) -> int:
    """The width of the vision tower's patch features of the HF CLIP/SigLIP folder (or tower) at `path`."""
    # lazy: imports transformers, only for an HF teacher folder
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", config).hidden_size


def hf_embed_dim(path: str) -> int:
    """The width of the embeddings of the HF CLIP/SigLIP folder at `path` (its config, no weights)."""
    # lazy: imports transformers, only for an HF teacher folder
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return config.projection_dim if config.model_type == "clip" else config.text_config.hidden_size


class HFDualTeacher(nn.Module):
    """An HF CLIP/SigLIP model reading the student's batch (see the module docstring)."""

    def __init__(self, path: str, decode: Callable[[list[int]], str], images: ImagesAs):
        super().__init__()
        # lazy: imports transformers, only for an HF teacher folder
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path).eval()
        self.tokenizer, self.decode, self.images = AutoTokenizer.from_pretrained(path), decode, images
        text = self.model.config.text_config
        self.max_len = text.max_position_embeddings
        self.padding = "max_length" if self.model.config.model_type == "siglip" else "longest"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=self.images(pixels))), dim=-1)

    def scale(self) -> torch.Tensor:
        """Its own logit scale, exponentiated (CLIP clips it at 100 in training)."""
        return self.model.logit_scale.exp().clamp(max=100.0)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Its vision model's last hidden state at every patch (B, P, D); CLIP's class token dropped."""
        hidden = self.model.vision_model(pixel_values=self.images(pixels)).last_hidden_state
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        return hidden[:, -side * side:]

    def encode_text(self, ids: torch.Tensor | None, text_pixels=None) -> torch.Tensor:
        texts = [self.decode(row) for row in ids.tolist()]
        enc = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_len, return_tensors="pt")
        enc = {k: v.to(ids.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if self.padding == "max_length":  # SigLIP pools the last position and was trained without a mask
            enc.pop("attention_mask", None)
        return F.normalize(_features(self.model.get_text_features(**enc)), dim=-1)


class HFVisionTeacher(nn.Module):
    """An HF vision model alone (a CLIP or SigLIP tower, DINOv2 with or without registers; no text
    tower, no shared space): patch features only, for the patch losses (`dense`, `masked`)."""

    def __init__(self, path: str, images: ImagesAs):
        super().__init__()
        # lazy: imports transformers, only for an HF teacher folder
        from transformers import AutoModel

        self.model, self.images = AutoModel.from_pretrained(path).eval(), images

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Its last hidden state at every patch (B, P, D): the tokens before the patches (CLIP's and
        DINOv2's class token, DINOv2's registers) dropped. DINOv2's is after its final norm, as its
        released features are used; CLIP's before its post-layernorm, as in `HFDualTeacher`."""
        x = self.images(pixels)
        hidden = self.model(pixel_values=x).last_hidden_state
        patch = self.model.config.patch_size
        return hidden[:, -(x.shape[-2] // patch) * (x.shape[-1] // patch):]


def _features(out) -> torch.Tensor:
    """Projected features from `get_*_features`: a tensor, or (transformers 5) its `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
