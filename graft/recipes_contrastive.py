"""The dual-encoder recipes (CLIP, SigLIP, CLIPPO, LiT) and CoCa; graft/recipes.py lists them with the rest."""

from __future__ import annotations

import math

from graft.config import Config


def _dual(name: str, loss: str) -> Config:
    """A dual encoder on the same 24 px world and ViT as shapes_vqa, so its tower plugs into a VLM."""
    cfg = Config(name=name, model="dual")
    cfg.vision.image_size, cfg.data.grid = 24, 3
    cfg.contrastive.loss = loss
    cfg.text.max_len = 20  # the longest caption (4 objects) is 19 tokens + <eos>
    cfg.train.steps, cfg.train.batch_size = 600, 128
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 50
    return cfg


def siglip() -> Config:
    """SigLIP: ViT + text tower (bidirectional, pooled at <eos>), sigmoid loss, on the Shapes world (~4 CPU min)."""
    cfg = _dual("siglip", "siglip")
    # The paper's t = 10, b = -10 (SigLIP §3.3) fit its batch of 32k, where 32k x σ(-10) ≈ 1.5
    # negatives balance the one positive at init. At batch 128 they leave the negatives ~150x
    # too weak (the loss only pulls pairs together), and t + b = 0 caps every positive at p = 0.5,
    # while Adam moves log t and b by about lr per step (measured: t 9.86, b -10.02 after 300
    # steps; zero-shot at chance). b = -log(127) ≈ -5 balances the batch at init (open_clip
    # #650); t = 20 lets a cosine gap of 0.5 span ±5 logits (t = 10 stalls, t ≥ 50 collapses).
    cfg.contrastive.init_logit_scale, cfg.contrastive.init_logit_bias = math.log(20.0), -5.0
    cfg.text.pool = "eos"  # measured at 300 steps: zero-shot 0.43 vs 0.31 pooled at the last <pad>
    cfg.train.steps = 1200
    return cfg


def clip() -> Config:
    """CLIP: ViT + text tower (causal, pooled at <eos>), softmax InfoNCE, on the Shapes world (~4 CPU min)."""
    cfg = _dual("clip", "clip")
    cfg.text.causal, cfg.text.pool = True, "eos"
    cfg.train.steps = 1500  # measured: 600 steps gave zero-shot 0.84, 1500 steps 1.00 (README)
    cfg.optim.lr = 2e-3
    return cfg


def coca() -> Config:
    """CoCa: CLIP's towers plus a 2-layer captioning decoder over the patch tokens; contrastive + captioning (1 : 2)."""
    cfg = clip()
    cfg.name, cfg.model = "coca", "coca"
    cfg.text.max_len = 21  # <bos>, the longest caption's 19 tokens, <eos>
    cfg.train.objectives = {"itc": 1.0, "caption": 2.0}  # open_clip's CoCa defaults
    cfg.eval.captions = 100
    return cfg


def clippo() -> Config:
    """CLIPPO: one ViT for images and for captions rendered as images, softmax loss as in CLIP (~8 CPU min).

    1,000 steps: zero-shot 0.905, i2t R@1 0.678 in 484 s on a 2-core CPU (README); a step costs
    ~3.6x a `siglip` step (36 patches for the image and the text, and the text is rendered).
    """
    cfg = clip()
    cfg.name = "clippo"
    cfg.contrastive.shared_tower = True
    # 48 px: 9 lines of 15 characters in a 5 px font (data/render.py) hold the longest caption.
    cfg.vision.image_size, cfg.vision.patch_size = 48, 8
    # Softmax, not sigmoid (CLIPPO trains with CLIP's loss). At init the one tower maps every
    # image to nearly one point and every rendered text to another (cosine 0.98 among images,
    # 0.996 among texts, -0.82 for every image-text pair alike), so the sigmoid loss sees a
    # single logit for all pairs; its gradient moves only that logit (norms 100-6,900 in the
    # first 50 steps) and it settles at the best constant logit (loss 5.85), fully collapsed.
    # Softmax is blind to a logit shared by a whole row, so only pair differences drive it.
    # lr 5e-4: at clip's 2e-3 the shared tower still collapses (loss log 128 by step 25); at
    # 5e-4 it leaves that point near step 120 and then learns steadily.
    cfg.optim.lr = 5e-4
    cfg.train.steps = 1000  # zero-shot 0.17 at 300 steps, 0.49-0.76 at 600, 0.905 at 1,000
    return cfg


def lit() -> Config:
    """LiT: the image side of vision.init_from=RUN (e.g. a siglip run) locked, text tower trained (~2 CPU min).

    Locked means the tower *and* its pooling head and projection, loaded from the run, as LiT does
    (big_vision `lit_coco.py` freezes `img/.*`): the text tower learns to meet a fixed embedding.
    Measured on a 1,200-step siglip tower, 600 steps: zero-shot 0.988, i2t R@1 0.926; with the
    head trained from scratch instead, 0.894 and 0.928 (README).
    """
    cfg = siglip()
    cfg.name = "lit"
    cfg.train.freeze = ["vision", "image_head"]
    cfg.train.steps = 600
    return cfg
