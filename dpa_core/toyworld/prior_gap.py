"""The language prior conflict, measured: how well the base LLM predicts each style's text.

Texts are scored as pretraining documents ("<|endoftext|>" text "<|endoftext|>"), every text token
and the closing separator predicted. Besides perplexity, the share of the loss that falls on
tokens of non-visual words (style and grammar) is reported: in the paper's word-level analysis
that share is what dominates on a conflicting caption set."""

from __future__ import annotations

import math
import re

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .chat import END_OF_TEXT
from .scenes import CONTENT_WORDS

_WORD = re.compile(r"[A-Za-z]+")


def _content_mask(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Per token: does it overlap a visual content word (colour, shape, position, ...)?"""
    content_chars = [False] * len(text)
    for m in _WORD.finditer(text):
        if m.group().lower() in CONTENT_WORDS:
            content_chars[m.start() : m.end()] = [True] * (m.end() - m.start())
    return [any(content_chars[a:b]) for a, b in offsets]


@torch.no_grad()
def score_texts(model: PreTrainedModel, tok: PreTrainedTokenizerFast, texts: list[str], batch: int = 16) -> dict:
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    total_nll = content_nll = 0.0
    n_tokens = n_content = 0
    for s in range(0, len(texts), batch):
        chunk = texts[s : s + batch]
        enc = tok(chunk, add_special_tokens=False, return_offsets_mapping=True)
        seqs = [[eot] + ids + [eot] for ids in enc["input_ids"]]
        width = max(len(q) for q in seqs)
        input_ids = torch.full((len(seqs), width), eot, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, q in enumerate(seqs):
            input_ids[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        for i, text in enumerate(chunk):
            n = len(enc["input_ids"][i]) + 1  # text tokens and the closing separator
            row = nll[i, :n]
            is_content = _content_mask(text, enc["offset_mapping"][i]) + [False]
            total_nll += row.sum().item()
            n_tokens += n
            content_nll += row[torch.tensor(is_content)].sum().item()
            n_content += sum(is_content)
    return {
        "ppl": math.exp(total_nll / n_tokens),
        "tokens_per_text": n_tokens / len(texts),
        "nats_per_text": total_nll / len(texts),
        "non_content_token_share": 1 - n_content / n_tokens,
        "non_content_loss_share": 1 - content_nll / total_nll,
        "texts": len(texts),
    }


def prior_gap(model: PreTrainedModel, tok: PreTrainedTokenizerFast, texts_by_style: dict[str, list[str]]) -> dict:
    scores = {style: score_texts(model, tok, texts) for style, texts in texts_by_style.items()}
    return {
        "ppl": {style: s["ppl"] for style, s in scores.items()},
        "uniform_ppl": len(tok),
        "detail": scores,
        "note": "base LLM perplexity per token; own_style is held-out text in the LLM's pretraining register "
                "(descriptions of benchmark scenes, never in its corpus); terse/verbose are caption texts.",
    }
