"""Tiny random Hugging Face models and tokenizers, built and `save_pretrained` by the tests (no hub).

LMs: Llama (Llama-2-style [INST] template), Qwen2 (ChatML template, <|im_end|> ends a turn),
GPT-2 (no chat template: graft's fallback is used). Vision: SigLIP (with its pooling head, unused)
and CLIP (with a CLIP preprocessor_config.json, so its mean/std must be picked up); DINOv2 with and
without registers (`make_dino`: a crop and a mean/std that are not the student's). Two-tower
CLIP and SigLIP models with their tokenizers (`make_dual`: distillation teachers). Tokenizers are
byte-level BPEs trained on the Shapes world's text, without an <image> token (graft adds it).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig, CLIPModel, SiglipConfig, SiglipModel,
    CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel,
)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from graft.data.shapes import ShapesWorld
from graft.data.tokenizer import world_corpus

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

_CORPUS = None


def _tokenizer(folder: Path, specials: list[str], template: str | None, **names) -> PreTrainedTokenizerFast:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = world_corpus(ShapesWorld(), n=300) + ["user", "assistant", "[INST]", "[/INST]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **names)
    fast.save_pretrained(str(folder))
    return fast


def make_lm(kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "llama":
        tok = _tokenizer(folder, ["<s>", "</s>"], LLAMA_TEMPLATE, bos_token="<s>", eos_token="</s>")
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, tie_word_embeddings=False))
    elif kind == "qwen2":
        tok = _tokenizer(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True))
    elif kind == "gpt2":
        tok = _tokenizer(folder, ["<|endoftext|>"], None, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    return folder


def make_vision(kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=24, patch_size=8)
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**arch)).save_pretrained(str(folder))
    elif kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**arch)).save_pretrained(str(folder))
        CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(str(folder))
    else:
        raise ValueError(kind)
    return folder


def make_dino(folder: Path, registers: int = 0, crop: int = 32) -> Path:
    """A DINOv2 model (with `registers` register tokens: Dinov2WithRegisters) of 8 px patches, its
    position table for 24 px (interpolated to the crop, as the released models' 518 px table is to
    224) and an image processor that crops to `crop` px with ImageNet's mean and std."""
    folder.mkdir(parents=True, exist_ok=True)
    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=24,
                patch_size=8)
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**arch, num_register_tokens=registers)).save_pretrained(folder)
    else:
        Dinov2Model(Dinov2Config(**arch)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_center_crop=True,
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(str(folder))
    return folder


def make_dual(kind: str, folder: Path, image_size: int = 32) -> Path:
    """A two-tower CLIP (projection 20, CLIP's mean and std, images of `image_size`) or SigLIP
    (width 32, mean = std = 0.5) model folder with its tokenizer, as released teachers are saved."""
    folder.mkdir(parents=True, exist_ok=True)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if kind == "clip":
        tok = _tokenizer(folder, ["<|startoftext|>", "<|endoftext|>"], None, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        text = dict(tower, vocab_size=len(tok), max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        CLIPModel(CLIPConfig(text_config=text, vision_config=dict(tower, image_size=image_size, patch_size=8),
                             projection_dim=20)).save_pretrained(str(folder))
        CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(str(folder))
    elif kind == "siglip":
        tok = _tokenizer(folder, ["</s>", "<pad>"], None, eos_token="</s>", pad_token="<pad>")
        text = dict(tower, vocab_size=len(tok), max_position_embeddings=16, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id)
        SiglipModel(SiglipConfig(text_config=text, vision_config=dict(tower, image_size=image_size, patch_size=8))
                    ).save_pretrained(str(folder))
    else:
        raise ValueError(kind)
    return folder
