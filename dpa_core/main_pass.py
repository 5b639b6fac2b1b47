"""The main (with-image) forward pass, with logits only where the loss looks.

A LLaVA batch is mostly image tokens (576 per image against ~128 caption tokens in alignment),
and no loss is taken at an image, prompt or padding position. The LM head therefore runs only on
the sequence positions that some row of the batch needs (HF's `logits_to_keep`, one set of
positions for the whole batch), and the cross-entropy and label scores are taken chunk by chunk
(`label_ce`) without float32 copies of the logits. Loss and gradients are those of the full
computation: positions left out have zero weight in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked_ce import chunk_rows, label_ce


@dataclass(frozen=True)
class MainPass:
    """Per shifted position [B, S-1], float32: `ce` the label's cross-entropy at `need` positions
    (differentiable; the stand-in label where the position is no target) and the label's raw
    `logit` and `logprob` there (detached). Zero outside `need`."""

    ce: torch.Tensor
    logit: torch.Tensor
    logprob: torch.Tensor


def main_pass(model, batch: dict, position_ids: torch.Tensor, need: torch.Tensor, scored: torch.Tensor,
              chunk_tokens: int) -> MainPass:
    """`need` [B, S-1] the shifted positions to score, `scored` [B, S-1] their labels (no ignore ids)."""
    b, s1 = need.shape
    cols = need.any(0).nonzero(as_tuple=True)[0]  # position t predicts token t+1, so shifted t = model position t
    logits = model(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                   attention_mask=batch["attention_mask"], position_ids=position_ids, use_cache=False,
                   logits_to_keep=cols).logits  # [B, K, V]
    vocab = logits.shape[-1]
    # Every kept row is scored (rows some other sequence needed cost a log-sum-exp, no copy).
    ce, logit = label_ce(logits.reshape(-1, vocab), scored[:, cols].reshape(-1), chunk_rows(chunk_tokens, vocab))
    rows = need[:, cols].reshape(-1).nonzero(as_tuple=True)[0]  # into the [B * K] kept rows
    grid = (torch.arange(b, device=need.device)[:, None] * s1 + cols[None, :]).reshape(-1)[rows]  # into [B * (S-1)]
    zeros = torch.zeros(b * s1, dtype=torch.float32, device=need.device)

    def spread(x):
        return zeros.scatter(0, grid, x[rows]).view(b, s1)

    return MainPass(ce=spread(ce), logit=spread(logit), logprob=spread(-ce.detach()))
