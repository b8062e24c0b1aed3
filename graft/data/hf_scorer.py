"""A local Hugging Face CLIP or SigLIP folder as `graft data score`'s model (data/score.py): the
released checkpoints most filtering pipelines score with (DataComp used OpenAI's CLIP ViT-L/14).

The folder is read as released models ship: config.json, weights, tokenizer and image processor
(preprocessor_config.json). Images go through the model's own image processor, captions through
its own tokenizer (SigLIP padded to its full length without a mask, as it was trained; CLIP to the
batch's longest), and the score is the cosine of `get_image_features` and `get_text_features`.
Records are read with graft's default data limits (`DataConfig`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from graft.config import Config
from graft.errors import UserError

KINDS = ("clip", "siglip")


def is_hf_folder(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


class HFScorer:
    score = "itc"  # its similarity (an HF CLIP/SigLIP has no matching head)

    def __init__(self, path: str):
        # lazy: transformers takes ~1 s to import, only for an HF folder
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        kind = AutoConfig.from_pretrained(path).model_type
        if kind not in KINDS:
            raise UserError(f"--with {path}: an HF '{kind}' model; scoring reads CLIP or SigLIP folders "
                            f"({', '.join(KINDS)}) or a graft dual-encoder run")
        if not (Path(path) / "preprocessor_config.json").is_file():
            raise UserError(f"--with {path}: no preprocessor_config.json (the model's image processor)")
        self.cfg = Config()
        self.model = AutoModel.from_pretrained(path).eval()
        self.images, self.tokenizer = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        self.padding = "max_length" if kind == "siglip" else "longest"
        self.max_len = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed(self, images, captions, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = [], []
        for i in range(0, len(images), batch_size):
            pixels = self.images(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
            img.append(_unit(self.model.get_image_features(pixel_values=pixels)))
            enc = self.tokenizer(captions[i:i + batch_size], padding=self.padding, truncation=True,
                                 max_length=self.max_len, return_tensors="pt")
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            if self.padding == "max_length":
                enc.pop("attention_mask", None)
            txt.append(_unit(self.model.get_text_features(**enc)))
        return torch.cat(img).float(), torch.cat(txt).float()

    @staticmethod
    def similarity(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return img @ txt.T


def _unit(out) -> torch.Tensor:
    """L2-normalised projected features: a tensor, or (transformers 5) its `pooler_output`."""
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
