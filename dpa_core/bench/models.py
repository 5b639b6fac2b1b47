"""Random-initialised Llava models (Qwen2-shaped LLM + CLIP-shaped vision tower) built from configs.

Nothing is downloaded: the benchmark only needs the shapes, not the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

PATCH = 14  # CLIP ViT-L/14


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int


# Qwen2-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936) with CLIP ViT-L/14.
QWEN2_05B_CLIP_L = ModelShape(896, 24, 14, 2, 4864, 151936, 1024, 24, 16)


def build_llava(shape: ModelShape, image_tokens: int, dtype: torch.dtype, seed: int = 0) -> LlavaForConditionalGeneration:
    """A Llava whose vision tower gives `image_tokens` tokens (a square grid of 14-pixel patches, CLS dropped)
    and whose image token id is the last vocabulary entry."""
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"image_tokens must be a square number (a patch grid), got {image_tokens}")
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=side * PATCH, patch_size=PATCH)
    text = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, rope_theta=1e6,
                       tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=shape.vocab - 1,
                         image_seq_length=image_tokens, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).to(dtype)


def set_trainable(model: LlavaForConditionalGeneration, shape: str) -> None:
    """alignment: connector only (LLM and vision frozen); instruction: connector + LLM (vision frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.model.multi_modal_projector]
    if shape == "instruction":
        trainable += [model.model.language_model, model.lm_head]
    elif shape != "alignment":
        raise ValueError(f"unknown training shape {shape!r}")
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
