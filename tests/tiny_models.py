"""Tiny models built from configs for tests: no downloads, a few seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "a red circle on the left of a blue square",
    "the green triangle is above two yellow circles",
    "what colour is the shape? it is red. how many shapes are there? three.",
    "describe the image briefly. a small purple square at the bottom right.",
] * 20
IMAGE_SIZE, PATCH = 16, 4  # 16 image tokens


def make_tokenizer(out: Path, vocab_size: int = 200) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", extra_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_llm(out: Path, family: str = "qwen2", hidden: int = 32, seed: int = 0) -> Path:
    out = Path(out)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        raise ValueError(family)
    model.save_pretrained(out)
    return out


def make_clip(out: Path, hidden: int = 24, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=32, projection_dim=16)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return Path(out)


def make_images(root: Path, n: int = 6, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
        name = f"img{i}.png"
        Image.fromarray(arr).save(root / name)
        names.append(name)
    return names


# LLaVA-1.5's conversation format (USER: <image>\n... ASSISTANT: ...), as llava-hf processors carry it.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def make_stock_llava(out: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny checkpoint in the llava-hf layout (LlavaForConditionalGeneration + LlavaProcessor,
    Llama LLM, CLIP vision tower), built from configs as llava-hf's conversion script builds the
    real ones: not through this project's build_llava."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out)
    tok = make_tokenizer(out / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=LLAVA_15_TEMPLATE if chat_template else None)
    if not chat_template:
        processor.tokenizer.chat_template = None
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
