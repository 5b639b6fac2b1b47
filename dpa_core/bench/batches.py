"""Synthetic training batches in the two shapes DPA trains on, right-padded like the project's Collator.

alignment ("plain" template): image tokens, then a caption; the caption tokens are the targets.
instruction (chat): a short system/user prefix, the image, then turns of prompt (ignored) and answer
(targets). Sequences in a batch get different text lengths, so padding is exercised.
"""

from __future__ import annotations

import torch

from ..losses import IGNORE_INDEX

PAD_ID = 0
PREFIX_TOKENS = 16  # system prompt + "<|im_start|>user\n" before the image
TURNS = 4
PROMPT_SHARE = 0.25  # of each instruction turn; the rest is the answer


def text_lengths(text_tokens: int, batch: int) -> list[int]:
    """The first sequence has `text_tokens`, later ones down to about 3/4 of it."""
    return [max(4, text_tokens - (i * text_tokens) // (4 * max(batch - 1, 1))) for i in range(batch)]


def one_sequence(shape: str, n_text: int, image_tokens: int, image_id: int, vocab: int, g: torch.Generator):
    text = torch.randint(1, image_id, (n_text,), generator=g)  # never pad, never the image token
    image = torch.full((image_tokens,), image_id)
    if shape == "alignment":
        return torch.cat([image, text]), torch.cat([torch.full_like(image, IGNORE_INDEX), text])
    prefix = min(PREFIX_TOKENS, n_text // 2)
    labels = text.clone()
    labels[:prefix] = IGNORE_INDEX
    turn = max((n_text - prefix) // TURNS, 1)
    for start in range(prefix, n_text, turn):
        labels[start : start + max(int(turn * PROMPT_SHARE), 1)] = IGNORE_INDEX
    ids = torch.cat([text[:prefix], image, text[prefix:]])
    return ids, torch.cat([labels[:prefix], torch.full_like(image, IGNORE_INDEX), labels[prefix:]])


def make_batch(shape: str, batch: int, text_tokens: int, image_tokens: int, image_size: int, vocab: int,
               image_id: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    seqs = [one_sequence(shape, n, image_tokens, image_id, vocab, g) for n in text_lengths(text_tokens, batch)]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for b, (ids, lab) in enumerate(seqs):
        input_ids[b, : len(ids)], labels[b, : len(ids)], mask[b, : len(ids)] = ids, lab, 1
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=g).to(dtype)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}
