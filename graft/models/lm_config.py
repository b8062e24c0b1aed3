"""`LMConfig`: the `lm` config section — the decoder's architecture (models/decoder.py), a Hugging
Face folder in its place, LoRA, the image tokens' own attention, positions and modules, and the
sparse mixture-of-experts FFNs (models/moe.py) — with its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from graft.errors import UserError

IMAGE_ATTENTION = ("causal", "bidirectional")
IMAGE_POSITIONS = ("1d", "mrope")


@dataclass
class LMConfig:
    vocab_size: int = 0  # 0 = take the tokenizer's size when the model is built
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 160
    # Weight init std; 0 = 1/sqrt(hidden_size). HF's fixed 0.02 suits d~4096; at d=128 it leaves
    # attention uniform for hundreds of steps (measured on the Shapes world).
    init_std: float = 0.0
    # A local Hugging Face AutoModelForCausalLM folder (Llama, Qwen2, GPT-2, ...) to use instead of
    # the built-in decoder, with its own tokenizer and chat template (models/hf_backbones.py).
    hf_path: str | None = None
    # With hf_path: load the folder's weights into this built-in decoder (a Llama folder: the same
    # function, parity-tested) instead of running the HF module, so that every built-in option
    # applies (Flamingo's blocks, the image tokens' own modules, MoE layers).
    builtin: bool = False
    # LoRA (Hu et al. 2021) through peft: rank 0 = off. The LM's own weights are then frozen and
    # only the adapters train; targets [] = every linear layer of the decoder blocks (models/lora.py).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    # Image tokens in the built-in decoder (docs/spatial.md measured both on the built-in world):
    # causal = like text | bidirectional = every token of an image sees the whole image (the
    # prefix-LM mask of PaliGemma); 1d = consecutive positions | mrope = 2-D rotary positions,
    # (time, row, column) over interleaved frequency pairs (M-RoPE, Qwen2-VL), text staying 1-D.
    image_attention: str = "causal"
    image_positions: str = "1d"
    # A learned row and a learned column vector added to each image token in the LM's input (its
    # cell on the token grid; models/image_layout.py CellEmbedding): where a token sits, in the
    # values attention reads, not only in its rotary phase (docs/spatial.md)
    image_cells: bool = False
    # Parameters of the image tokens' own (EVEv2, VLMo; the mission's "domain-specific norms"), each
    # a copy of the text one at initialisation, so an untrained model is unchanged by them; part
    # `lm_image` of train.freeze (`train.freeze: [vision, lm]` trains only them and the connector).
    modality_norms: bool = False  # image tokens through RMSNorms of their own in every layer (both)
    modality_ffn: bool = False  # image tokens through an FFN of their own in every layer
    # Sparse mixture-of-experts FFNs (models/moe.py) in layers k-1, 2k-1, ... (k = moe_every); 0 = dense
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_intermediate_size: int = 0  # each expert's hidden width; 0 = intermediate_size
    moe_routing: str = "agnostic"  # agnostic | aware (image tokens to the first half of the experts, text to the rest)
    moe_balance: str = "loss"  # loss (named loss moe_balance, weigh it in train.objectives) | bias (aux-loss-free)
    moe_bias_rate: float = 1e-3

    @property
    def hf_module(self) -> bool:
        """Whether the LM is a Hugging Face module (lm.hf_path without lm.builtin)."""
        return bool(self.hf_path) and not self.builtin

    @staticmethod
    def check(cfg: LMConfig, image_grid: bool = True) -> None:
        """Values exist; the image keys need the built-in decoder, and `mrope` a connector whose
        tokens form a square grid (`image_grid`)."""
        _check_moe(cfg)
        for key in ("modality_norms", "modality_ffn"):
            if cfg.hf_module and getattr(cfg, key):
                raise UserError(f"lm.{key} needs the built-in decoder (lm.hf_path is set: add lm.builtin=true)")
        for key, valid in (("image_attention", IMAGE_ATTENTION), ("image_positions", IMAGE_POSITIONS)):
            value = getattr(cfg, key)
            if value not in valid:
                raise UserError(f"lm.{key}={value!r} is not one of {', '.join(valid)}")
            if cfg.hf_module and value != valid[0]:
                raise UserError(f"lm.{key}={value} needs the built-in decoder (lm.hf_path is set: add lm.builtin=true)")
        if cfg.builtin and not cfg.hf_path:
            raise UserError("lm.builtin=true loads an HF folder into the built-in decoder: set lm.hf_path")
        if cfg.image_positions == "mrope" and not image_grid:
            raise UserError("lm.image_positions=mrope needs image tokens on a grid; this connector's tokens have none")
        if cfg.image_cells and cfg.hf_module:
            raise UserError("lm.image_cells needs the built-in decoder (lm.hf_path is set: add lm.builtin=true)")
        if cfg.image_cells and not image_grid:
            raise UserError("lm.image_cells needs image tokens on a grid; this connector's tokens have none")


ROUTING = ("agnostic", "aware")
BALANCE = ("loss", "bias")


def _check_moe(cfg: LMConfig) -> None:
    """The MoE keys of an LM config: in range, and consistent with each other."""
    if cfg.moe_experts == 0:
        return
    if cfg.moe_experts < 2:
        raise UserError(f"lm.moe_experts={cfg.moe_experts}: a mixture needs at least 2 experts (0 = a dense FFN)")
    groups = 2 if cfg.moe_routing == "aware" else 1
    if not 1 <= cfg.moe_top_k <= cfg.moe_experts // groups:
        raise UserError(f"lm.moe_top_k={cfg.moe_top_k} must be between 1 and the {cfg.moe_experts // groups} experts "
                        "a token may choose from")
    if cfg.moe_routing not in ROUTING:
        raise UserError(f"lm.moe_routing={cfg.moe_routing!r} is not one of {', '.join(ROUTING)}")
    if cfg.moe_routing == "aware" and cfg.moe_experts % 2:
        raise UserError(f"lm.moe_experts={cfg.moe_experts}: modality-aware routing splits the experts in two halves")
    if cfg.moe_balance not in BALANCE:
        raise UserError(f"lm.moe_balance={cfg.moe_balance!r} is not one of {', '.join(BALANCE)}")
    if not 1 <= cfg.moe_every <= cfg.layers:
        raise UserError(f"lm.moe_every={cfg.moe_every} must be between 1 and lm.layers={cfg.layers}")
    if cfg.hf_module:
        raise UserError("lm.moe_experts needs the built-in decoder (lm.hf_path is set: add lm.builtin=true)")
