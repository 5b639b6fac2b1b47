"""The language-prior gap: an LLM's perplexity on each caption source's text.

A large gap between the base LLM's perplexity on its own kind of text and on a caption style
is the conflict DPA addresses; the proxy LLM's perplexity on held-out captions shows how much of
that gap the proxy stage closed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import torch

from .data import Collator, Encoder
from .losses import IGNORE_INDEX


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 512) -> float:
    """Token-level perplexity exp(mean NLL) of `texts` (each followed by EOS)."""
    model.eval()
    enc, collate = Encoder(tokenizer, max_length=max_length), Collator(tokenizer.pad_token_id)
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, len(texts), batch_size):
        batch = collate([enc.text(t) for t in texts[s : s + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        nll += loss.item()
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(nll / max(count, 1))


def perplexity_by_source(model, tokenizer, records: Iterable[dict], **kw) -> dict[str, float]:
    """{"source": ppl} for text records {"source", "text"}."""
    groups = defaultdict(list)
    for r in records:
        groups[r.get("source", "all")].append(r["text"])
    return {name: perplexity(model, tokenizer, texts, **kw) for name, texts in sorted(groups.items())}
