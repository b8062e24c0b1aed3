"""Recipes: named functions returning a `Config`. Variants call a base and change fields.

`graft recipes` lists them with the first line of each docstring.
"""

from __future__ import annotations

from graft.config import Config
from graft.config_checks import apply_overrides
from graft.errors import UserError
from graft.models.vit import VisionConfig
from graft.recipes_contrastive import clip, clippo, coca, lit, siglip


def shapes_vqa() -> Config:
    """Default: ViT + MLP connector + Llama-style LM trained end to end on the Shapes world (~5 CPU min)."""
    cfg = Config(name="shapes_vqa")
    # 24 px images on a 3x3 board with 8 px patches: one patch per cell, 9 image tokens.
    cfg.vision.image_size, cfg.data.grid = 24, 3
    cfg.data.questions_per_image = 6  # every question the scene allows: one image, many answers
    cfg.train.steps = 800  # 263-310 s of training on a 2-core CPU (README benchmarks)
    # and the test scenes drawn by a second renderer (data/restyle.py): the world's concepts, not its pixels
    cfg.eval.splits = ["test", "compositional", "restyled"]
    return cfg


def shapes_linear() -> Config:
    """shapes_vqa with a linear connector instead of the MLP."""
    cfg = shapes_vqa()
    cfg.name = "shapes_linear"
    cfg.connector.kind = "linear"
    return cfg


def shapes_resampler() -> Config:
    """shapes_vqa with a Perceiver Resampler connector (Flamingo, Idefics2): 9 latents, 1 layer, 8 heads.

    9 latents: as many image tokens as shapes_vqa's 9 patches, so a comparison with the `mlp`
    connector is of the connector alone; 1 layer: a step then costs about what an mlp step does
    (115-135 vs 130 samples/s, batch 32, one core); 8 heads of 16 dims (4: vqa_acc 0.42 vs 0.47, one seed).
    It learns from scratch much more slowly than the mlp connector. Measured at batch 32: with
    one object per image, 200 steps, colour accuracy 0.33-0.65 over four seeds; with two
    objects, 0.16-0.36 through 1,500 steps (mlp: 0.78 at 200); the recipe's own world, 800
    steps: vqa_acc 0.54, colour 0.42. A fresh resampler attends almost uniformly, so every
    patch gets nearly the same gradient and the from-scratch ViT learns little per-patch detail
    (its features vary 2-3x less across patches than under the mlp connector). The tower is the
    bottleneck: with `vision.init_from` a 200-step mlp run, two objects reach colour 0.74 in 200
    steps. Flamingo and Idefics2 train their resamplers on pretrained towers.
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_resampler"
    cfg.connector.kind = "resampler"
    cfg.connector.latents, cfg.connector.layers, cfg.connector.heads = 9, 1, 8
    return cfg


def shapes_pixel_shuffle() -> Config:
    """shapes_vqa with Idefics3's pixel-shuffle connector: 2x2 patches → one token, 4 image tokens instead of 9.

    Changed besides the connector: images are 32 px instead of 24 (the same scenes, rendered
    larger), because the pixel shuffle needs a patch grid whose side r=2 divides: 8 px patches
    give 4x4 patches → 2x2 tokens, each covering a 16 px quadrant, which does not line up with
    the board's 3x3 cells.
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_pixel_shuffle"
    cfg.connector.kind, cfg.connector.scale_factor = "pixel_shuffle", 2
    cfg.vision.image_size = 32
    return cfg


def shapes_avgpool() -> Config:
    """shapes_vqa with MM1's average-pooling connector: the 3x3 patch grid pooled to 2x2, 4 image tokens instead of 9.

    Nothing else changes. 3 is not divisible by 2, so the adaptive pooling bins overlap: each
    token is the mean of a 2x2 block of patches, and the middle row and column feed two tokens each.
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_avgpool"
    cfg.connector.kind, cfg.connector.tokens = "avgpool", 4
    return cfg


def shapes_flamingo() -> Config:
    """Flamingo on the Shapes world: gated cross-attention before every LM layer reads the image's 9 projected patches.

    Everything trains from scratch here (Flamingo freezes a pretrained LM and trains a resampler on
    a pretrained tower); the MLP connector's patch tokens instead of resampler latents, for the
    reason `shapes_resampler` gives: from scratch, a resampler learns slowly.
    """
    cfg = shapes_vqa()
    cfg.name, cfg.model = "shapes_flamingo", "flamingo"
    return cfg


def shapes_fuyu() -> Config:
    """Fuyu on the Shapes world: no vision encoder, each 8 px patch projected by one linear map into the LM."""
    cfg = shapes_vqa()
    cfg.name, cfg.model = "shapes_fuyu", "fuyu"
    cfg.connector.kind = "linear"
    return cfg


def shapes_spatial() -> Config:
    """Fuyu with a per-patch MLP, cell vectors, grounded spatial questions and a comparison head: learns spatial relations: the demo.

    Each choice is measured in docs/spatial.md: with a ViT the LM places a named object from its
    token only 0.6-0.75 of the time (the tower's attention mixes the cells), while a per-patch MLP
    keeps each token one cell's content (0.98); `lm.image_cells` puts the cell itself in the token;
    grounded questions (half of them, `data.grounded_spatial`) supervise where each named object
    is, and three more spatial questions per scene (`data.spatial_questions`) give the comparison
    enough answers per step; a training-only head at each spatial answer (`data.spatial_compare`,
    weight 0.1) asks for how the two named objects' columns and rows compare, which the yes/no
    answer alone leaves to luck. Evaluation questions are the world's own. At this length (720
    steps of 44, within 180 s on a 2-core CPU) five train.seeds in six learn spatial relations
    (val 0.88-0.92; seed 5 0.69). `graft demo` trains it (DEMO).
    """
    cfg = shapes_fuyu()
    cfg.name = "shapes_spatial"
    cfg.connector.kind = "mlp"
    cfg.lm.image_cells = True
    cfg.data.grounded_spatial, cfg.data.spatial_questions = 0.5, 3
    cfg.data.spatial_compare, cfg.train.objectives = True, {"lm": 1.0, "compare": 0.1}
    cfg.train.batch_size, cfg.train.steps = 44, 720
    return cfg


def motion_vqa() -> Config:
    """The world in motion (data/motion.py): each clip's 3 frames into the LM as Fuyu patches through a per-patch MLP.

    Questions need the frames in order: which way an object moved, what appeared, how many frames
    show an object, its colour at the start, the colour it turned. A per-patch connector keeps each
    token one cell of one frame (docs/spatial.md: a ViT mixes the cells), so a move is a change of
    token between frames.
    """
    cfg = shapes_fuyu()
    cfg.name = "motion_vqa"
    cfg.connector.kind = "mlp"
    cfg.data.source, cfg.data.max_objects, cfg.data.frames = "motion", 2, 3
    cfg.data.questions_per_image = 5  # every question a clip allows
    cfg.eval.splits = ["test"]
    return cfg


def shapes_moe() -> Config:
    """shapes_vqa with sparse MoE FFNs: 4 experts per LM layer, each as wide as the dense FFN, top-1 (equal active parameters).

    A token runs through one expert, so a step costs about what shapes_vqa's does (plus the router);
    the LM holds 4x the FFN parameters. Switch-style balancing loss at weight 0.01, every token may
    go to every expert (`lm.moe_routing=agnostic`; `shapes_moe_aware` splits them by modality).
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_moe"
    cfg.lm.moe_experts, cfg.lm.moe_top_k = 4, 1
    cfg.train.objectives = {"lm": 1.0, "moe_balance": 0.01}
    return cfg


def shapes_moe_aware() -> Config:
    """shapes_moe with modality-aware routing: image tokens choose among experts 0-1, text tokens among 2-3."""
    cfg = shapes_moe()
    cfg.name = "shapes_moe_aware"
    cfg.lm.moe_routing = "aware"
    return cfg


def shapes_interleaved() -> Config:
    """shapes_vqa on interleaved documents: 3 images each with one question, then questions across them.

    `data.images_per_doc=3` (data/documents.py): each image with one of its questions (or its
    caption), then "which image shows ...?" and a question about an earlier image. Evaluated by
    the world's VQA and the `documents` and `fewshot` tasks. A row holds one document (about 110
    tokens), so nothing packs two of them into 160 tokens.
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_interleaved"
    cfg.data.images_per_doc, cfg.data.questions_per_image = 3, 1
    cfg.eval.tasks = ["documents=test", "fewshot=test"]
    cfg.eval.shots = [0, 4]
    return cfg


def sensors_vlm() -> Config:
    """Series tower + MLP connector + LM on the built-in sensor world: questions about 8 s wrist IMU recordings."""
    cfg = Config(name="sensors_vlm")
    cfg.data.source = "sensors"  # 6-channel recordings of activities; test = people never seen
    cfg.data.questions_per_image = 3  # every question a recording allows
    cfg.eval.splits, cfg.eval.captions = ["test"], 100  # captions: CIDEr-D of "describe the recording."
    cfg.train.steps = 600
    return cfg


def sensors_clip() -> Config:
    """A series–text dual encoder (series tower + text tower, CLIP's loss) on the sensor world: each
    recording with its caption; scored by zero-shot activity and retrieval on people never seen."""
    cfg = Config(name="sensors_clip", model="dual")
    cfg.data.source = "sensors"
    cfg.contrastive.loss, cfg.contrastive.embed_dim = "clip", 64
    cfg.text.causal, cfg.text.pool = True, "eos"
    cfg.text.max_len = 16  # the longest caption ("the person was ..., then ... after 5 seconds") + <eos>
    cfg.eval.splits, cfg.eval.zeroshot_images, cfg.eval.retrieval_pairs = ["test"], 350, 500
    cfg.train.steps, cfg.train.batch_size = 300, 64
    cfg.optim.lr = 1e-3
    return cfg


def sensors_qformer_stage1() -> Config:
    """BLIP-2 stage 1 on the sensor world: series tower + Q-Former (8 queries), ITC + ITM + ITG on
    each recording's caption; scored by zero-shot activity and retrieval on people never seen."""
    cfg = Config(name="sensors_qformer_stage1", model="qformer_stage1")
    cfg.data.source = "sensors"
    cfg.train.objectives = {"itc": 1.0, "itm": 1.0, "itg": 1.0}
    cfg.eval.splits, cfg.eval.zeroshot_images, cfg.eval.retrieval_pairs = ["test"], 350, 500
    cfg.train.steps, cfg.train.batch_size = 300, 64
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 40
    return cfg


def tiny() -> Config:
    """A seconds-long smoke test: tiny model, few steps (for tests and trying the CLI)."""
    cfg = shapes_vqa()
    cfg.name = "tiny"
    cfg.vision.hidden_size, cfg.vision.layers, cfg.vision.intermediate_size = 32, 1, 64
    cfg.lm.hidden_size, cfg.lm.layers, cfg.lm.intermediate_size = 32, 1, 64
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.ckpt_every = 20, 16, 5, 10
    cfg.optim.warmup_steps = 5
    cfg.eval.vqa_per_type, cfg.eval.captions = 10, 10
    cfg.eval.splits = ["test", "compositional"]  # not shapes_vqa's restyled split: seconds count here
    return cfg


def shapes_scale() -> Config:
    """shapes_vqa with 8-wide heads, batches of 16 and a 20-step warmup: the base of `graft scale sweep`'s default ladder.

    8-wide heads (2 per KV head) make the ladder's width unit 16 instead of 64, so that it reaches
    the compute-optimal sizes (tens of thousands of parameters) of budgets a 2-core CPU trains in
    minutes; smaller batches give such budgets enough steps, and runs of 40 steps and more get past
    the warmup (docs/scaling.md).
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_scale"
    cfg.lm.heads, cfg.lm.kv_heads, cfg.vision.heads = 16, 8, 16
    cfg.train.batch_size, cfg.optim.warmup_steps = 16, 20
    return cfg


def shapes_scale_fuyu() -> Config:
    """shapes_scale as Fuyu (no vision encoder, 8 px patches projected linearly): the early-fusion side of the per-design sweep."""
    cfg = shapes_scale()
    cfg.name, cfg.model, cfg.connector.kind = "shapes_scale_fuyu", "fuyu", "linear"
    cfg.vision.heads = VisionConfig().heads  # Fuyu has no tower to give heads to
    return cfg


def llava_stage1() -> Config:
    """LLaVA stage 1: train the connector only (vision and LM frozen), on captions.

    Meaningful with a pretrained vision tower and LM (train.init_from=RUN); from scratch on the
    Shapes world it shows the mechanics, not good accuracy.
    """
    cfg = shapes_vqa()
    cfg.name = "llava_stage1"
    cfg.train.freeze = ["vision", "lm"]
    cfg.data.questions_per_image, cfg.data.caption_prob = 0, 1.0
    cfg.optim.lr = 1e-3
    return cfg


def llava_stage2() -> Config:
    """LLaVA stage 2: connector + LM trained on questions (vision frozen); set train.init_from=STAGE1_RUN."""
    cfg = shapes_vqa()
    cfg.name = "llava_stage2"
    cfg.train.freeze = ["vision"]
    cfg.optim.lr = 5e-4
    return cfg


def llava_stage2_lora() -> Config:
    """LLaVA stage 2 with LoRA: connector + rank-16 adapters on the LM (LM weights and vision frozen)."""
    cfg = llava_stage2()
    cfg.name = "llava_stage2_lora"
    cfg.lm.lora_rank, cfg.lm.lora_alpha = 16, 32.0
    cfg.optim.lr = 1e-3  # adapters start at zero and tolerate a larger step than full fine-tuning
    return cfg


def llava_7b() -> Config:
    """LLaVA-style 7B for GPU clusters: Llama-2-7B-sized LM + SigLIP-so400m-sized ViT, FSDP2, bf16 (see --dry-run).

    Meant for GPUs, 2 nodes x 8 in deploy/ (docs/cluster.md); on a CPU, `graft train llava_7b
    --dry-run --gpus 16` prints its memory per GPU without making a weight. The settings are
    LLaVA-1.5's stage 2 (Liu et al. 2023): projector and LM trained, tower frozen; global batch
    128 (8 conversations per GPU on 16 GPUs, one micro-batch; on 8 GPUs keep it with
    train.batch_size=16, train.grad_accum=2), lr 2e-5 with 3 % warmup and cosine decay, no weight
    decay, one epoch of its 665k conversations (5,200 steps), 2,048-token rows. FSDP2 with bf16
    compute and activation checkpointing: ~21.7 GiB per GPU by the plan, where DDP would need ~158.

    The weights start random: LLaVA starts from a trained LM and tower, so set `lm.hf_path` /
    `vision.hf_path` (local HF folders) or `train.init_from`, and `data.*` to the data (the built-in
    world is only the default). What differs from the originals: the decoder is HF Llama's
    architecture at Llama-2-7B's size (RMSNorm, SwiGLU, RoPE, 32 heads without GQA, untied 32,000-row
    embeddings: 6,738 M parameters) but its tokenizer is graft's BPE trained on the data (at most
    32,000 tokens), not Llama's SentencePiece; the tower is SigLIP-so400m's (27 layers, width 1152,
    16 heads, MLP 4304, 14 px patches) at 378 px: 27 x 27 = 729 patches, as SigLIP's 384 px whose
    convolution drops the last 6 pixels (graft wants the size divisible by the patch), and without
    the attention-pooling head, which a VLM does not use. Not yet run on GPUs.
    """
    cfg = Config(name="llava_7b")
    v = cfg.vision
    v.image_size, v.patch_size = 378, 14
    v.hidden_size, v.layers, v.heads, v.intermediate_size = 1152, 27, 16, 4304
    lm = cfg.lm
    lm.hidden_size, lm.layers, lm.heads, lm.kv_heads, lm.intermediate_size = 4096, 32, 32, 32, 11008
    lm.vocab_size, lm.tie_embeddings, lm.max_seq_len = 32000, False, 2048  # LLaVA-1.5 trains at 2,048
    lm.init_std = 0.02  # HF Llama's initializer_range, right at this width (LMConfig.init_std)
    cfg.data.vocab_size = 32000  # the BPE's size when graft trains one on the data (no lm.hf_path)
    cfg.data.workers = 4
    cfg.train.freeze = ["vision"]  # LLaVA-1.5 trains the projector and the LM
    cfg.train.precision = "bf16"
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.steps = 8, 1, 5200
    cfg.train.ckpt_every, cfg.train.log_every = 250, 10
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.beta2 = 2e-5, 150, 0.0, 0.999
    cfg.parallel.kind, cfg.parallel.activation_checkpointing = "fsdp2", True
    cfg.eval.splits = []  # the built-in world says little about this model: set eval.tasks on held-out data
    return cfg


def shapes_qformer_stage1() -> Config:
    """BLIP-2 stage 1: ViT + Q-Former (9 queries) trained with ITC + ITM + ITG on the Shapes world's captions.

    The same 24 px world and ViT as shapes_vqa, so stage 2 (`shapes_qformer`) can take this run's
    tower and Q-Former; 9 queries: as many image tokens as shapes_vqa's 9 patches and
    shapes_resampler's 9 latents. The ViT trains with the Q-Former (BLIP-2 freezes a pretrained
    one; from scratch there is none to freeze: `train.freeze=[vision]` with `vision.init_from`).
    """
    cfg = Config(name="shapes_qformer_stage1", model="qformer_stage1")
    cfg.vision.image_size, cfg.data.grid = 24, 3
    cfg.qformer.queries = 9
    cfg.train.objectives = {"itc": 1.0, "itm": 1.0, "itg": 1.0}  # BLIP-2 weighs the three equally
    cfg.train.steps, cfg.train.batch_size = 400, 64
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 40
    return cfg


def shapes_qformer() -> Config:
    """BLIP-2 stage 2: the Q-Former connector (9 query tokens) + LM on questions; set connector.init_from=STAGE1_RUN.

    `connector.init_from` brings the stage-1 run's image encoder and Q-Former (frozen tower, as
    BLIP-2); the projection to the LM width and the LM (from scratch here) train with the Q-Former.
    """
    cfg = shapes_vqa()
    cfg.name = "shapes_qformer"
    cfg.connector.kind = "qformer"
    cfg.connector.qformer.queries = 9  # = shapes_qformer_stage1's
    cfg.train.freeze = ["vision"]
    return cfg


DEMO = "shapes_spatial"  # what `graft demo` trains (README line 1)

RECIPES = {f.__name__: f for f in (shapes_vqa, shapes_linear, shapes_resampler, shapes_pixel_shuffle, shapes_avgpool,
                                   shapes_flamingo, shapes_fuyu, shapes_spatial, shapes_moe, shapes_moe_aware, shapes_interleaved,
                                   motion_vqa,
                                   sensors_vlm, sensors_clip, sensors_qformer_stage1,
                                   tiny, shapes_scale, shapes_scale_fuyu, llava_stage1, llava_stage2, llava_stage2_lora, llava_7b, siglip, clip, coca, clippo, lit,
                                   shapes_qformer_stage1, shapes_qformer)}
# Recipes that start from another recipe's run: recipe → (the key naming that run, the recipe that
# makes it). `graft compare` trains such a stage once per seed and points the key at it.
STAGES = {
    "shapes_qformer": ("connector.init_from", "shapes_qformer_stage1"),
    "llava_stage2": ("train.init_from", "llava_stage1"),
    "llava_stage2_lora": ("train.init_from", "llava_stage1"),
}


def recipe(name: str, overrides: list[str]) -> Config:
    """Recipe `name`'s config with `--set` overrides ("section.key=value") applied and validated."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}' (valid: {', '.join(RECIPES)})")
    return apply_overrides(RECIPES[name](), overrides)
