"""The designs: the ways a model is made to see. `model: NAME` in a config picks one.

Each design is one module here that registers a `Design` (registry.py), which states everything
the rest of graft asks of it, so that no other file decides by the design's name or the model's
type:

- `capabilities`: what its models can do, which decides what evaluation, `data show`, generation
  and export ask of them — GENERATES (answers in text from images and a prompt: VQA, captions,
  class-name likelihoods) and EMBEDS (embeds images and texts in one space: zero-shot by
  similarity, retrieval), and CAPTIONS (captions an image with no prompt: CoCa). A design may have several; each task scores with the first of its scorers
  whose capability the design has (eval/tasks.py).
- `sections`: the config sections it reads besides the shared ones (name, model, data, optim,
  train, eval); `--set` on a model section it does not read is an error (config_checks.py).
- `parts`: the module names `train.freeze` may list.
- `build(cfg, tok, pretrained)` → the model; `processor(cfg, tok, model)` → what turns records
  into rows (and how many placeholders an image gets; every source's records, the built-in
  world's included, reach the model through it); `tokens(batch, pad)` → the text tokens of a
  micro-batch, for throughput; `validate(cfg)` → design-specific config checks. (FLOPs need no
  entry: the trainer counts them on the real forward and backward, trainer/flops.py.)
- `losses`: the names of the losses its model returns; `train.objectives` may weigh them. The
  model's `forward(**batch)` returns (output, {name: local sum}) and `loss_counts(**batch)` what
  each sum is over (graft/losses.py). `packs`: its batches of an indexed source (the built-in world) can
  pack several conversations into one row (with the built-in LM). `exports_llava`: `graft export` can write it as HF LLaVA.
- `teacher(cfg, model, tok)`, `objectives(cfg, model)`: a frozen teacher the trainer holds outside the
  model, and named objectives over the model's outputs, the batch and the teacher's
  (graft/objectives.py; EVE's in fuyu.py). `train_inputs(cfg)`: keyword arguments of the model's
  forward in training (the VLMs' `answers_only`).

A new design is its module (and its model file) and one line below; docs/architecture.md walks
through an example.
"""

# The registry lines: importing a design's module registers it (in this order: `model=` errors list them so).
from graft.designs import vlm  # noqa: F401, I001
from graft.designs import flamingo  # noqa: F401
from graft.designs import fuyu  # noqa: F401
from graft.designs import dual  # noqa: F401
from graft.designs import qformer_stage1  # noqa: F401
from graft.designs import coca  # noqa: F401
from graft.designs.registry import (CAPABILITIES, CAPTIONS, DESIGNS, EMBEDS, GENERATES, SHARED_SECTIONS, Design, can_pack,
                                    design, model_sections, uses_packing)

MODEL_SECTIONS = model_sections()

__all__ = ["CAPABILITIES", "CAPTIONS", "DESIGNS", "EMBEDS", "GENERATES", "MODEL_SECTIONS", "SHARED_SECTIONS", "Design", "model_sections",
           "can_pack", "design", "uses_packing"]
