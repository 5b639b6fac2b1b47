"""Token-weighted cross-entropy: vanilla, CMO (DPA) and CAL.

All three share one shape (see docs/method.md):
    loss = sum_j w_j * CE_j / (sum_{j target} w_j + 1e-6)
with w_j = 1 for vanilla (a plain mean), and for CMO/CAL a detached weight scored from two passes
over the same sequence, with and without the image:
    CMO: delta_j = p(y_j | image, prefix) - p(y_j | prefix), clamped to [delta_min, delta_max]
    CAL: delta_j = logit(y_j | image, prefix) - logit(y_j | prefix), clamped to [1, 5]
then smoothed by a width-3 moving average (padded cells not counted).

Reference details reproduced by default ("flat" smoothing): labels are shifted as in every causal
LM; ignored positions still get a weight (scored with token id 0 as a stand-in label) that takes
part in the smoothing; smoothing runs over the flattened batch, crossing sequence boundaries.
`smoothing="per_sequence"` smooths each sequence's target tokens only.
Given the attention mask (as the training objective does), padding is left out of the flat stream:
the sequences are laid end to end without their padding, so left and right padding give the same
weights. Without padding this is exactly the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked_ce import scan_label_scores
from .settings import LossConfig, Smoothing  # noqa: F401  (the loss settings, re-exported)

IGNORE_INDEX = -100
STAND_IN_LABEL = 0
EPS = 1e-6


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits[:, :-1] (position t predicts token t+1)."""
    return labels[:, 1:]


def stand_in(labels: torch.Tensor) -> torch.Tensor:
    return labels.masked_fill(labels == IGNORE_INDEX, STAND_IN_LABEL)


@torch.no_grad()
def label_logit_and_logprob(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 1024):
    """The label token's raw logit and log-probability, per token, in float32.

    Works chunk by chunk over tokens, so no full-vocabulary probability tensor is materialised.
    `logits` [..., V], `labels` [...] (no ignore ids; use `stand_in` first).
    """
    flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    picked, lse = scan_label_scores(lab.shape[0], chunk_tokens, lambda r: flat[r], lambda r: lab[r], logits.device)
    return picked.view(labels.shape), (picked - lse).view(labels.shape)


def raw_token_scores(kind: str, logit: torch.Tensor, logprob: torch.Tensor, logit_ni: torch.Tensor, logprob_ni: torch.Tensor):
    """delta_j before clamping: probability difference (cmo) or logit difference (cal)."""
    if kind == "cmo":
        return logprob.exp() - logprob_ni.exp()
    if kind == "cal":
        return logit - logit_ni
    raise ValueError(f"no token scores for loss kind {kind!r}")


def stream_cells(attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Shifted positions that belong to a sequence (query and predicted token both real, or a target):
    the cells that flat smoothing lays end to end. Padding cells are left out."""
    m = attention_mask.bool()
    return (m[:, :-1] & m[:, 1:]) | target


def smooth(weights: torch.Tensor, target: torch.Tensor, window: int = 3, mode: Smoothing = "flat",
           keep: torch.Tensor | None = None) -> torch.Tensor:
    """Width-`window` moving average (stride 1, same-size output, padded cells not counted).

    flat: over the whole batch laid end to end (the reference), restricted to the `keep` cells
    (see `stream_cells`) when given; per_sequence: over each sequence's target tokens only, leaving
    other positions untouched.
    """
    if window <= 1:
        return weights
    pad = window // 2
    if mode == "flat":
        if keep is None:
            flat = weights.reshape(1, 1, -1)
            return F.avg_pool1d(flat, window, stride=1, padding=pad, count_include_pad=False).view_as(weights)
        idx = keep.reshape(-1).nonzero(as_tuple=True)[0]
        out = weights.reshape(-1).clone()
        if idx.numel():
            out[idx] = F.avg_pool1d(out[idx].reshape(1, 1, -1), window, stride=1, padding=pad,
                                    count_include_pad=False).view(-1)
        return out.view_as(weights)
    if mode != "per_sequence":
        raise ValueError(f"unknown smoothing {mode!r}; use 'flat' or 'per_sequence'")
    out = weights.clone()
    for b in range(weights.shape[0]):
        idx = target[b].nonzero(as_tuple=True)[0]
        if idx.numel():
            seq = weights[b, idx].reshape(1, 1, -1)
            out[b, idx] = F.avg_pool1d(seq, window, stride=1, padding=pad, count_include_pad=False).view(-1)
    return out


def token_weights(delta: torch.Tensor, target: torch.Tensor, cfg: LossConfig, keep: torch.Tensor | None = None):
    lo, hi = cfg.clamp
    return smooth(delta.clamp(lo, hi), target, cfg.window, cfg.smoothing, keep)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, S] (0 at ignored positions), computed in float32 like HF's loss."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(labels.shape)


def weighted_mean(ce: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (weights * ce).sum() / (weights[target].sum() + EPS)


def vanilla_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain mean next-token CE over target tokens (unshifted labels, -100 ignored)."""
    labels = shift_labels(labels)
    target = labels != IGNORE_INDEX
    ce = token_ce(logits[:, :-1], labels)
    return ce.sum() / target.sum().clamp(min=1)


def contrastive_loss(logits, logits_no_image, labels, cfg: LossConfig, return_stats: bool = False,
                     attention_mask: torch.Tensor | None = None):
    """CMO or CAL loss from full logits of both passes (unshifted labels). With `attention_mask`,
    padding is left out of flat smoothing (see `stream_cells`)."""
    labels = shift_labels(labels)
    logits, logits_no_image = logits[:, :-1], logits_no_image[:, :-1]
    target = labels != IGNORE_INDEX
    scored = stand_in(labels)
    lg, lp = label_logit_and_logprob(logits.detach(), scored, cfg.chunk_tokens)
    lg_ni, lp_ni = label_logit_and_logprob(logits_no_image.detach(), scored, cfg.chunk_tokens)
    delta = raw_token_scores(cfg.kind, lg, lp, lg_ni, lp_ni)
    keep = stream_cells(attention_mask, target) if attention_mask is not None else None
    return loss_from_deltas(token_ce(logits, labels), delta, target, cfg, return_stats, keep)


def loss_from_deltas(ce, delta, target, cfg: LossConfig, return_stats: bool = False, keep: torch.Tensor | None = None):
    """The weighted loss once per-token deltas are known (shared by every image-free pass)."""
    w = token_weights(delta, target, cfg, keep)
    loss = weighted_mean(ce, w, target)
    if not return_stats:
        return loss
    return loss, weight_stats(delta, w, target, cfg)


@torch.no_grad()
def weight_stats(delta, w, target, cfg: LossConfig) -> dict[str, float]:
    if not target.any():
        return {}
    d, wt = delta[target], w[target]
    lo, hi = cfg.clamp
    return {
        "delta_mean": d.mean().item(),
        "weight_mean": wt.mean().item(),
        "weight_std": wt.std(unbiased=False).item(),
        "frac_at_min": (d <= lo).float().mean().item(),
        "frac_at_max": (d >= hi).float().mean().item(),
    }


def cmo_loss(logits, logits_no_image, labels, delta_min: float = 0.05, delta_max: float = 0.5, window: int = 3,
             smoothing: Smoothing = "flat") -> torch.Tensor:
    """DPA's contrastive modality optimisation loss. Shapes: [B, S, V], [B, S, V], [B, S] (unshifted)."""
    cfg = LossConfig("cmo", delta_min=delta_min, delta_max=delta_max, window=window, smoothing=smoothing)
    return contrastive_loss(logits, logits_no_image, labels, cfg)


def cal_loss(logits, logits_no_image, labels, clamp_min: float = 1.0, clamp_max: float = 5.0, window: int = 3,
             smoothing: Smoothing = "flat") -> torch.Tensor:
    """CAL (Xiao et al. 2024): logit difference clamped to [clamp_min, clamp_max], same smoothing and mean."""
    cfg = LossConfig("cal", cal_min=clamp_min, cal_max=clamp_max, window=window, smoothing=smoothing)
    return contrastive_loss(logits, logits_no_image, labels, cfg)


@torch.no_grad()
def label_scores_at(rows: torch.Tensor, labels: torch.Tensor, logits_of, chunk_tokens: int = 1024):
    """Label logit and log-probability at flat token indices `rows`, `logits_of(idx) -> [n, V]` called
    chunk by chunk so that at most `chunk_tokens` x V logits exist at once."""
    picked, lse = scan_label_scores(rows.numel(), chunk_tokens, lambda r: logits_of(rows[r]),
                                    lambda r: labels[rows[r]], labels.device)
    return picked, picked - lse


def rows_that_matter(target: torch.Tensor, cfg: LossConfig, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Positions whose weight can reach the loss: targets and, with flat smoothing, their
    neighbours within the window across the flattened batch (of the `keep` cells, when given)."""
    if cfg.smoothing == "per_sequence" or cfg.window <= 1:
        return target
    idx = keep.reshape(-1).nonzero(as_tuple=True)[0] if keep is not None else None
    flat = target.reshape(-1) if idx is None else target.reshape(-1)[idx]
    need = flat.clone()
    for k in range(1, cfg.window // 2 + 1):
        need[:-k] |= flat[k:]
        need[k:] |= flat[:-k]
    if idx is None:
        return need.view_as(target)
    out = target.reshape(-1).clone()
    out[idx] = need
    return out.view_as(target)
