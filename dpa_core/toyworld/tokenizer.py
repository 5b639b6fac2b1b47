"""The world's tokenizer: byte-level BPE (as in Qwen2/GPT-2, so any text encodes without <unk>),
trained on ALL of the world's text, caption styles included. A style is then unfamiliar to the
base LLM because it never saw it used, not because its words fall apart into bytes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .chat import CHAT_TEMPLATE, END_OF_TEXT, IM_END, IM_START, SPECIAL_TOKENS


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    # Qwen2.5-Instruct conventions: a turn ends with <|im_end|> (the eos for chat generation),
    # <|endoftext|> separates documents and pads; there is no bos token. No <image> token: the
    # project's model assembly adds it, as it must for a real LLM.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
