"""The training objective of one multimodal batch: forward, image-free pass if needed, token-weighted loss."""

from __future__ import annotations

import torch

from .chunked_ce import chunk_rows
from .image_free import efficient_hidden, image_mask, llava_of, position_ids_for, reference_logits
from .losses import (
    IGNORE_INDEX,
    LossConfig,
    contrastive_loss,
    label_scores_at,
    loss_from_deltas,
    raw_token_scores,
    rows_that_matter,
    shift_labels,
    stand_in,
    stream_cells,
    vanilla_loss,
)
from .main_pass import MainPass, main_pass


def multimodal_loss(model, batch: dict, cfg: LossConfig, return_stats: bool = False):
    """Loss of a batch {input_ids, attention_mask, pixel_values, labels} under `cfg` (pixel_values absent
    when every record of the batch is text-only)."""
    out = _multimodal_loss(model, batch, cfg, return_stats)
    if batch.get("pixel_values") is None and torch.is_grad_enabled():
        # A text-only batch never reaches the connector, and DDP fails on a trainable parameter that got no
        # gradient. Adding 0 x the connector keeps it in the graph (its gradient is 0).
        touch = sum(p.sum() for p in llava_of(model).model.multi_modal_projector.parameters() if p.requires_grad)
        if isinstance(touch, torch.Tensor):
            loss = (out[0] if return_stats else out) + 0.0 * touch
            out = (loss, out[1]) if return_stats else loss
    return out


def _multimodal_loss(model, batch: dict, cfg: LossConfig, return_stats: bool = False):
    position_ids = position_ids_for(batch["attention_mask"])
    if cfg.needs_image_free_pass and cfg.image_free == "reference":
        return reference_contrastive_loss(model, batch, position_ids, cfg, return_stats)
    labels = shift_labels(batch["labels"])
    target = labels != IGNORE_INDEX
    # Vanilla needs the targets only; CMO/CAL also the label scores of the positions whose weight
    # can reach the loss through the smoothing.
    keep = stream_cells(batch["attention_mask"], target)  # flat smoothing skips padding
    need = rows_that_matter(target, cfg, keep) if cfg.needs_image_free_pass else target
    main = main_pass(model, batch, position_ids, need, stand_in(labels), cfg.chunk_tokens)
    ce = torch.where(target, main.ce, 0.0)
    if not cfg.needs_image_free_pass:
        loss = ce.sum() / target.sum().clamp(min=1)
        return (loss, {}) if return_stats else loss
    delta = efficient_deltas(model, batch, position_ids, main, need, cfg)
    return loss_from_deltas(ce, delta, target, cfg, return_stats, keep)


def reference_contrastive_loss(model, batch: dict, position_ids, cfg: LossConfig, return_stats: bool = False):
    """CMO/CAL as the paper's code computes it: full logits of both passes, the image-free one with image
    tokens masked out of attention over the full sequence."""
    logits = model(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                   attention_mask=batch["attention_mask"], position_ids=position_ids, use_cache=False).logits
    ni, has_source = reference_logits(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                      position_ids, boundary=cfg.image_boundary)
    ni = torch.where(has_source[..., None], ni, logits.detach())
    return contrastive_loss(logits, ni, batch["labels"], cfg, return_stats, attention_mask=batch["attention_mask"])


@torch.no_grad()
def efficient_deltas(model, batch: dict, position_ids, main: MainPass, need: torch.Tensor, cfg: LossConfig):
    """delta [B, S-1] (float32) at the `need` positions, from a text-only image-free pass; 0 elsewhere
    and where no text precedes (as the reference: there the image-free prediction is the main one).

    The image-free label scores come from the LM head applied chunk by chunk to the rows needed, so
    at most `chunk_rows` x V scores exist at once.
    """
    queries = None
    if cfg.image_boundary == "image_position":
        # Image positions whose weight can reach the loss take their own masked-pass output (upstream).
        is_image = image_mask(batch["input_ids"], batch["attention_mask"], llava_of(model).config.image_token_id)
        queries = torch.zeros_like(is_image)
        queries[:, :-1] = need & is_image[:, :-1]
    hidden_ni, has_source = efficient_hidden(model, batch["input_ids"], batch["attention_mask"], position_ids,
                                             pixel_values=batch.get("pixel_values"), image_queries=queries)
    hidden_ni = hidden_ni[:, :-1]
    rows = (need & has_source[:, :-1]).reshape(-1).nonzero(as_tuple=True)[0]
    b, s1 = need.shape
    scored = stand_in(shift_labels(batch["labels"])).reshape(-1)
    lm_head = llava_of(model).lm_head
    chunk = chunk_rows(cfg.chunk_tokens, lm_head.out_features)

    def logits_of(idx):
        return lm_head(hidden_ni[idx // s1, idx % s1])

    lg_ni, lp_ni = label_scores_at(rows, scored, logits_of, chunk)
    delta = torch.zeros(b * s1, dtype=torch.float32, device=need.device)
    delta[rows] = raw_token_scores(cfg.kind, main.logit.reshape(-1)[rows], main.logprob.reshape(-1)[rows], lg_ni, lp_ni)
    return delta.view(b, s1)


def text_loss(model, batch: dict) -> torch.Tensor:
    """Plain causal-LM loss of a text-only batch (the proxy stage)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return vanilla_loss(logits, batch["labels"])
