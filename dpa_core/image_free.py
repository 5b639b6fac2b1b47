"""The image-free pass that CMO and CAL compare against: the same sequence with the image removed.

Two formulations that give the same weights:
- reference: the full sequence with image tokens masked out of attention (the paper's code);
- efficient: image tokens dropped, each text token keeping its original position id. For every
  text query this is the same computation as masking (no text token attends to an image key in
  either), at the cost of a pass over the text tokens only (a few dozen against 576 image
  tokens in alignment batches).

Positions whose query is an image token (the last one predicts the first token after the image)
are handled by `boundary`:
- "last_text": the prediction is taken from the last text token before the image, "the prefix
  without the image". Where no text precedes it, there is nothing to compare with and the caller
  uses delta = 0 (the weight then sits at the lower clamp bound).
- "image_position" (upstream, fnlp-vision/DPA qwen_dpa.py): the image position's own output in
  the masked pass: its input is still its image feature, its attention sees the text before the
  image only. Where no key is visible (no text before the image), the attention adds nothing
  (zero output): what upstream's flash-attention kernel gives for a query dropped by the mask
  (eager attention would average over every position there, future tokens included).

The image-free pass runs without dropout (LoRA dropout, attention dropout): its output is a
reference to compare with, and a random mask there would put dropout noise into the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch

Boundary = Literal["last_text", "image_position"]


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


@contextmanager
def without_dropout(module: torch.nn.Module):
    """Every submodule in eval mode (no dropout) for the duration; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def attention_modules(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in language_model.named_modules() if name.endswith("self_attn")]


@contextmanager
def zero_attention_where(language_model: torch.nn.Module, rows: torch.Tensor):
    """Replace the attention output of the query rows `rows` [B, S] by zeros in every layer (what a
    flash-attention kernel returns for a query with no visible key). Assumes o_proj without bias, as in
    Qwen2, Llama and Gemma 2."""
    if not rows.any():
        yield
        return

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = torch.where(rows[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handles = [m.register_forward_hook(hook) for m in attention_modules(language_model)]
    if not handles:
        raise RuntimeError("no self_attn modules found in the language model")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def image_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return attention_mask.bool() & (input_ids == image_token_id)


def image_features_flat(llava, pixel_values: torch.Tensor) -> torch.Tensor:
    """The connector's output for every image token of the batch [N_image_tokens, H], in the order the
    model fills them in (row-major over the batch)."""
    cfg = llava.config
    feats = llava.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return torch.cat(list(feats.pooler_output), dim=0)


@torch.no_grad()
def reference_logits(model, input_ids, attention_mask, pixel_values, position_ids=None,
                     boundary: Boundary = "last_text") -> tuple[torch.Tensor, torch.Tensor]:
    """Image-free logits [B, S, V] by masking image tokens out of attention, plus `has_source` [B, S]."""
    llava = llava_of(model)
    is_text = text_mask(input_ids, attention_mask, llava.config.image_token_id)
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    if boundary == "image_position":
        # Queries with no visible key: every key before them (and they themselves) masked out.
        blind = attention_mask.bool() & (is_text.long().cumsum(1) == 0)
        with without_dropout(llava), zero_attention_where(llava.model.language_model, blind):
            out = llava(input_ids=input_ids, pixel_values=pixel_values, attention_mask=is_text.long(),
                        position_ids=position_ids, use_cache=False)
        return out.logits, attention_mask.bool()
    with without_dropout(llava):
        out = llava(input_ids=input_ids, pixel_values=pixel_values, attention_mask=is_text.long(),
                    position_ids=position_ids, use_cache=False)
    src = source_index(is_text)
    logits = out.logits.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, out.logits.shape[-1]))
    return logits, src >= 0


@torch.no_grad()
def efficient_hidden(model, input_ids, attention_mask, position_ids=None, *, pixel_values=None,
                     image_queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-free final hidden states [B, S, H] from a pass over the text tokens only, plus `has_source`.

    Row t holds the hidden state of the last text token at or before t, so `lm_head(row t)`
    predicts token t+1 from the image-free prefix. No gradient, no KV cache, no dropout.

    `image_queries` [B, S] (boundary "image_position"): image positions whose own masked-pass output is
    wanted instead. They join the pass as queries only (their image feature as input, their original
    position id; no position attends to them), and row t of such a position holds its own output.
    """
    llava = llava_of(model)
    is_text = text_mask(input_ids, attention_mask, llava.config.image_token_id)
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    if image_queries is not None and image_queries.any():
        with without_dropout(llava):
            return _hidden_with_image_queries(llava, input_ids, attention_mask, position_ids, pixel_values,
                                              is_text, image_queries & attention_mask.bool())
    with without_dropout(llava):
        return _text_hidden(llava, input_ids, is_text, position_ids)


def _text_hidden(llava, input_ids, is_text, position_ids):
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


def _hidden_with_image_queries(llava, input_ids, attention_mask, position_ids, pixel_values, is_text, queries):
    b, s = input_ids.shape
    dev = input_ids.device
    is_image = image_mask(input_ids, attention_mask, llava.config.image_token_id)
    if (queries & ~is_image).any():
        raise ValueError("image_queries must be image positions")
    chosen = is_text | queries
    n = chosen.sum(1)
    width = max(int(n.max()), 1)
    ar = torch.arange(s, device=dev).expand(b, s)
    order = torch.where(chosen, ar, ar + s).argsort(dim=1)[:, :width]  # chosen positions first, in sequence order
    keep = torch.arange(width, device=dev)[None] < n[:, None]
    lm = llava.model.language_model
    embeds = lm.get_input_embeddings()(input_ids.masked_fill(~is_text, 0))
    feats = image_features_flat(llava, pixel_values).to(embeds.dtype)
    rank = is_image.reshape(-1).long().cumsum(0).view(b, s) - 1  # index of each image token among all of them
    embeds = torch.where(is_image[..., None], feats[rank.clamp(min=0)], embeds)
    x = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    pos = position_ids.gather(1, order).masked_fill(~keep, 0)
    key_text = is_text.gather(1, order) & keep
    # Causal over the compact order, keys: text only (image queries are seen by no one, not even themselves).
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool, device=dev))[None] & key_text[:, None, :]
    blind = ~allowed.any(-1)  # queries with no visible key: zero attention (see the module docstring)
    mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype)[:, None]
    with zero_attention_where(lm, blind):
        hidden = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    # Row t: its own compact row if t is a query image position, else that of the last text token at or before t.
    compact = chosen.long().cumsum(1) - 1
    last_text_pos = source_index(is_text)
    src_text = compact.gather(1, last_text_pos.clamp(min=0))
    src = torch.where(queries, compact, torch.where(last_text_pos >= 0, src_text, torch.full_like(compact, -1)))
    full = hidden.gather(1, src.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    return full, src >= 0
