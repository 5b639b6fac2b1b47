"""The image-free pass that CMO and CAL compare against: the same sequence with the image removed.

Two formulations that give the same weights:
- reference: the full sequence with image tokens masked out of attention (the paper's code);
- efficient: image tokens dropped, each text token keeping its original position id. For every
  text query this is the same computation as masking (no text token attends to an image key in
  either), at the cost of a pass over the text tokens only (a few dozen against 576 image
  tokens in alignment batches).

Positions whose query is an image token have no image-free counterpart. Their prediction (the
token after the image) is taken from the last text token before the image: "the prefix without
the image". Where no text precedes it, there is nothing to compare with and the caller uses
delta = 0 (the weight then sits at the lower clamp bound).
"""

from __future__ import annotations

import torch


def llava_of(model):
    """The LlavaForConditionalGeneration inside DDP / peft wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding, so left and right padding give the same numbers."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def text_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return attention_mask.bool() & (input_ids != image_token_id)


def source_index(is_text: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the last text position at or before it (-1 if none)."""
    ar = torch.arange(is_text.shape[1], device=is_text.device).expand_as(is_text)
    return torch.where(is_text, ar, torch.full_like(ar, -1)).cummax(dim=1).values


@torch.no_grad()
def reference_logits(model, input_ids, attention_mask, pixel_values, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-free logits [B, S, V] by masking image tokens out of attention, plus `has_source` [B, S]."""
    llava = llava_of(model)
    is_text = text_mask(input_ids, attention_mask, llava.config.image_token_id)
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    out = llava(input_ids=input_ids, pixel_values=pixel_values, attention_mask=is_text.long(),
                position_ids=position_ids, use_cache=False)
    src = source_index(is_text)
    logits = out.logits.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, out.logits.shape[-1]))
    return logits, src >= 0


@torch.no_grad()
def efficient_hidden(model, input_ids, attention_mask, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-free final hidden states [B, S, H] from a pass over the text tokens only, plus `has_source`.

    Row t holds the hidden state of the last text token at or before t, so `lm_head(row t)`
    predicts token t+1 from the image-free prefix. No gradient, no KV cache.
    """
    llava = llava_of(model)
    is_text = text_mask(input_ids, attention_mask, llava.config.image_token_id)
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    b, s = input_ids.shape
    n_text = is_text.sum(1)
    width = max(int(n_text.max()), 1)
    ar = torch.arange(s, device=input_ids.device).expand(b, s)
    # Stable order: text positions first (in sequence order), everything else after.
    order = torch.where(is_text, ar, ar + s).argsort(dim=1)[:, :width]
    keep = torch.arange(width, device=input_ids.device)[None] < n_text[:, None]
    ids = input_ids.gather(1, order).masked_fill(~keep, 0)
    pos = position_ids.gather(1, order).masked_fill(~keep, 0)
    lm = llava.model.language_model
    # The mask must be passed even without padding: with no mask, transformers reads the jumps in
    # `pos` (where the image was) as the starts of packed sequences and would cut attention there.
    hidden = lm(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=keep.long(), position_ids=pos,
                use_cache=False).last_hidden_state
    # cumsum of text tokens up to t - 1 is the compact index of t's source text token.
    src = is_text.long().cumsum(1) - 1
    full = hidden.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    return full, src >= 0
