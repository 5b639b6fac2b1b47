"""The training objective of one multimodal batch: forward, image-free pass if needed, token-weighted loss."""

from __future__ import annotations

import torch

from .image_free import efficient_hidden, llava_of, position_ids_for, reference_logits
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
    token_ce,
    vanilla_loss,
)


def multimodal_loss(model, batch: dict, cfg: LossConfig, return_stats: bool = False):
    """Loss of a batch {input_ids, attention_mask, pixel_values, labels} under `cfg`."""
    position_ids = position_ids_for(batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], position_ids=position_ids, use_cache=False).logits
    labels = batch["labels"]
    if not cfg.needs_image_free_pass:
        loss = vanilla_loss(logits, labels)
        return (loss, {}) if return_stats else loss
    if cfg.image_free == "reference":
        ni, has_source = reference_logits(model, batch["input_ids"], batch["attention_mask"],
                                          batch["pixel_values"], position_ids)
        ni = torch.where(has_source[..., None], ni, logits.detach())
        return contrastive_loss(logits, ni, labels, cfg, return_stats)
    return efficient_contrastive_loss(model, logits, batch, position_ids, cfg, return_stats)


def efficient_contrastive_loss(model, logits, batch, position_ids, cfg: LossConfig, return_stats: bool = False):
    """Same weights as the reference, from a text-only image-free pass, scoring only the positions
    whose weight can reach the loss and never holding more than `chunk_tokens` x V scores."""
    labels = shift_labels(batch["labels"])
    target = labels != IGNORE_INDEX
    hidden_ni, has_source = efficient_hidden(model, batch["input_ids"], batch["attention_mask"], position_ids)
    rows = (rows_that_matter(target, cfg) & has_source[:, :-1]).reshape(-1).nonzero(as_tuple=True)[0]
    scored = stand_in(labels).reshape(-1)
    main = logits[:, :-1].detach()
    main_flat = main.reshape(-1, main.shape[-1])
    hid = hidden_ni[:, :-1].reshape(-1, hidden_ni.shape[-1])
    lm_head = llava_of(model).lm_head
    lg, lp = label_scores_at(rows, scored, lambda i: main_flat[i], cfg.chunk_tokens)
    lg_ni, lp_ni = label_scores_at(rows, scored, lambda i: lm_head(hid[i]), cfg.chunk_tokens)
    delta = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    delta[rows] = raw_token_scores(cfg.kind, lg, lp, lg_ni, lp_ni)
    return loss_from_deltas(token_ce(logits[:, :-1], labels), delta.view_as(labels), target, cfg, return_stats)


def text_loss(model, batch: dict) -> torch.Tensor:
    """Plain causal-LM loss of a text-only batch (the proxy stage)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return vanilla_loss(logits, batch["labels"])
