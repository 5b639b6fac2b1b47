"""Cross-entropy and label scores of selected logit rows, chunk by chunk over rows.

`F.cross_entropy(logits.float(), ...)` holds, besides the logits, a float32 copy and a float32
log-softmax of every row for the backward pass: three [tokens, vocab] tensors, which at a 152k
vocabulary dominate a small model's memory. `label_ce` keeps only the logits (already alive as
the LM head's output) and one float32 log-sum-exp per row; the backward pass recomputes the
softmax chunk by chunk and writes the gradient straight into one tensor of the logits' dtype.
The gradient is the same expression, (softmax - onehot) * upstream, evaluated in float32 per row
as PyTorch does; only the order of floating-point operations differs.

It also returns the label's raw logit and log-probability, which CMO/CAL need for their weights,
at no extra pass.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# At most this many float32 scores per chunk: ~110 rows at a 152k vocabulary, and never more than
# `LossConfig.chunk_tokens` rows. Keeps the transient memory of scoring a small fraction of the
# logits the main pass holds anyway.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(chunk_tokens: int, vocab: int) -> int:
    return max(1, min(chunk_tokens, CHUNK_ELEMENTS // max(vocab, 1)))


def scan_label_scores(n: int, chunk: int, rows_logits, rows_labels, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The label's raw logit and the row's log-sum-exp (float32) for `n` rows, `chunk` rows at a time:
    `rows_logits(slice) -> [rows, V]` and `rows_labels(slice) -> [rows]` give one chunk's logits and
    labels, so at most `chunk` x V float32 scores exist at once. log p(label) = picked - lse."""
    picked = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty_like(picked)
    for s in range(0, n, chunk):
        rows = slice(s, s + chunk)
        x = rows_logits(rows).float()  # a view for float32 logits
        picked[rows] = x.gather(1, rows_labels(rows)[:, None]).squeeze(1)
        lse[rows] = torch.logsumexp(x, dim=-1)
    return picked, lse


class _LabelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk):
        picked, lse = scan_label_scores(labels.shape[0], chunk, lambda r: logits[r], lambda r: labels[r], logits.device)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(picked)
        return lse - picked, picked

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, _grad_picked):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            x, out = logits[s : s + ctx.chunk], grad[s : s + ctx.chunk]
            # float32 logits: the softmax is built in place in the gradient tensor, no temporary.
            p = torch.sub(x, lse[s : s + ctx.chunk, None], out=out) if x.dtype == torch.float32 \
                else x.float() - lse[s : s + ctx.chunk, None]
            p.exp_().scatter_add_(1, labels[s : s + ctx.chunk, None], torch.full_like(p[:, :1], -1.0))
            p.mul_(grad_ce[s : s + ctx.chunk, None])
            if p is not out:
                out.copy_(p)
        return grad, None, None


def label_ce(logits: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Per-row cross-entropy (float32, differentiable w.r.t. `logits`) and the label's raw logit (detached).

    `logits` [N, V], `labels` [N] valid token ids (no ignore ids; a stand-in where the row does not
    matter, whose gradient is then zero). log p(label) is `-ce`. Rows are taken as contiguous
    slices of `chunk` rows, so no row is copied out of `logits`.
    """
    return _LabelCE.apply(logits, labels, chunk)
