"""Issue 13, item 2: the CMO weight at the image boundary, against upstream's masked pass.

Upstream (fnlp-vision/DPA, llava_qwen_dpa.py `base_forward`) runs the model twice over the same
embeddings: once with the attention mask, once with the image positions removed from the 2-D
attention mask (position_ids None), then scores every shifted position from the two logits. The
image-free prediction of the first token after the image is the *last image position's own
output* in the masked pass. It is restated here independently of dpa_core (no project helper is
used for it): eager attention, a 2-D mask with holes, position_ids None, softmax, clamp, AvgPool1d,
weighted mean, as upstream writes them.

Where no text precedes the image (Qwen, plain template: no BOS) the image positions have no
visible key. Upstream ran flash-attention 2, whose unpadded kernel drops such a query: its
attention output is zero. Eager attention would instead average over every position (future
tokens included) - an artefact of the additive mask, not upstream. For that layout the
independent pass is eager attention with those rows zeroed, registered as its own attention
implementation below.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import CrossEntropyLoss
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from dpa_core.image_free import efficient_hidden, position_ids_for, without_dropout
from dpa_core.losses import IGNORE_INDEX, LossConfig
from dpa_core.objective import multimodal_loss
from tests.tiny_models import make_llm

N_IMG = 16
TOL = 1e-5


def _flash_like_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    # A query whose keys are all masked gets no attention output (flash-attention's unpadded kernel).
    blind = (attention_mask == torch.finfo(attention_mask.dtype).min).all(-1)  # [B, 1, Q]
    return out.masked_fill(blind[:, 0, :, None, None], 0.0), weights


AttentionInterface.register("eager_blind_rows_zeroed", _flash_like_eager)
AttentionMaskInterface.register("eager_blind_rows_zeroed", eager_mask)


@pytest.fixture(scope="module")
def model(tiny_paths):
    from dpa_core.modeling import build_llava

    torch.manual_seed(0)
    m, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    with torch.no_grad():  # sharpen, so that the image visibly moves label probabilities
        m.model.language_model.norm.weight.mul_(8.0)
        for p in m.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    return m.eval()


@torch.no_grad()
def greedy_tokens(model, prefix: torch.Tensor, pixel_values: torch.Tensor, n: int) -> torch.Tensor:
    """The model's own greedy continuation: labels the image makes likely (random labels have
    near-zero probability with and without the image, and every weight would sit at delta_min)."""
    ids = prefix[None]
    for _ in range(n):
        logits = model(input_ids=ids, pixel_values=pixel_values[None], use_cache=False).logits[0, -1]
        logits[model.config.image_token_id] = -torch.inf
        ids = torch.cat([ids, logits.argmax()[None, None]], dim=1)
    return ids[0, len(prefix):]


def _batch(model, layout: str, seed: int = 0) -> dict:
    """Two sequences of equal length (no padding, so the flat smoothing is upstream's exactly), each an
    image then its caption (the plain template; every caption token a target). "alignment": nothing
    before the image (Qwen: no BOS); "alignment_bos": one text token before it (Llama, Gemma: BOS)."""
    g = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=g)
    rows, labels = [], []
    for b in range(2):
        prefix = torch.randint(4, image_id, (1 if layout == "alignment_bos" else 0,), generator=g)
        head = torch.cat([prefix, torch.full((N_IMG,), image_id)])
        ids = torch.cat([head, greedy_tokens(model, head, pixel_values[b], 3)])
        target = torch.arange(len(ids)) >= len(head)
        rows.append(ids)
        labels.append(torch.where(target, ids, torch.full_like(ids, IGNORE_INDEX)))
    ids = torch.stack(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.stack(labels),
            "pixel_values": pixel_values}


@torch.no_grad()
def upstream_cmo_loss(model, batch, attn: str, delta_min=0.05, delta_max=0.5) -> torch.Tensor:
    """qwen_dpa.py base_forward, restated (no dpa_core code)."""
    before = model.config._attn_implementation
    # The vision tower runs eager in both cases (its attention has no mask).
    model.set_attn_implementation({"text_config": attn, "vision_config": "eager"})
    try:
        ids, mask, pv = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        labels = batch["labels"].clone()
        is_image = ids == model.config.image_token_id
        logits_wo_img = model(input_ids=ids, pixel_values=pv, attention_mask=mask.masked_fill(is_image, 0),
                              position_ids=None, use_cache=False).logits.float()
        logits = model(input_ids=ids, pixel_values=pv, attention_mask=mask, position_ids=None,
                       use_cache=False).logits.float()
    finally:
        model.set_attn_implementation(before)
    vocab = logits.shape[-1]
    shift_logits = logits[..., :-1, :].reshape(-1, vocab)
    shift_labels = labels[..., 1:].reshape(-1)
    labels_c = shift_labels.clone()
    labels_c[labels_c == IGNORE_INDEX] = 0
    p_w = torch.softmax(shift_logits, -1).gather(1, labels_c[:, None])
    p_wo = torch.softmax(logits_wo_img[..., :-1, :].reshape(-1, vocab), -1).gather(1, labels_c[:, None])
    sub = torch.clamp(p_w - p_wo, min=delta_min, max=delta_max)
    sub = torch.nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False)(sub[:, 0][None, None])[0, 0]
    loss = CrossEntropyLoss(reduction="none")(shift_logits, shift_labels) * sub
    return loss.sum() / (sub[shift_labels != IGNORE_INDEX].sum() + 1e-6)


@pytest.mark.parametrize("image_free", ["efficient", "reference"])
@pytest.mark.parametrize("layout,attn", [("alignment_bos", "eager"), ("alignment", "eager_blind_rows_zeroed")], ids=["bos", "no_bos"])
def test_image_position_boundary_matches_upstream(model, layout, attn, image_free):
    batch = _batch(model, layout)
    # Bounds wide open (a valid setting): every delta reaches the loss unclamped, so a different
    # image-free prediction anywhere shows (with 0.05/0.5 the boundary delta of these sharpened tiny
    # models often clamps to the same bound both ways).
    want = upstream_cmo_loss(model, batch, attn, delta_min=-1.0, delta_max=1.0)
    cfg = LossConfig("cmo", delta_min=-1.0, delta_max=1.0, image_free=image_free, image_boundary="image_position")
    with torch.no_grad():
        got = multimodal_loss(model, batch, cfg)
        old = multimodal_loss(model, batch, LossConfig("cmo", delta_min=-1.0, delta_max=1.0, image_free=image_free,
                                                       image_boundary="last_text"))
        paper = multimodal_loss(model, batch, LossConfig("cmo", image_free=image_free, image_boundary="image_position"))
    torch.testing.assert_close(paper, upstream_cmo_loss(model, batch, attn), rtol=TOL, atol=TOL)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    # The setting matters: the project's earlier substitution gives another loss on these batches.
    # Measured: the project matches upstream to <= 2e-7; last_text differs by 0.26 (BOS) and 6e-5 (no BOS:
    # there last_text uses delta = 0 at the boundary, upstream a prediction from the last patch alone).
    assert abs(old.item() - want.item()) > TOL, (old.item(), want.item())


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("layout", ["alignment_bos", "alignment"])
def test_image_position_boundary_efficient_equals_reference_on_padded_batches(model, layout, padding):
    """The short text-only pass (plus image queries) gives the full masked pass's loss with padding too."""
    batch = _batch(model, layout)
    for k in ("input_ids", "labels", "attention_mask"):  # row 1 three tokens shorter
        row = batch[k][1, :-3]
        fill = torch.full((3,), IGNORE_INDEX if k == "labels" else 0, dtype=row.dtype)
        batch[k][1] = torch.cat([row, fill] if padding == "right" else [fill, row])
    with torch.no_grad():
        eff = multimodal_loss(model, batch, LossConfig("cmo", image_free="efficient", image_boundary="image_position"))
        ref = multimodal_loss(model, batch, LossConfig("cmo", image_free="reference", image_boundary="image_position"))
    torch.testing.assert_close(eff, ref, rtol=TOL, atol=TOL)


def test_image_free_pass_is_deterministic_under_lora_dropout(tiny_paths):
    """Item 4: in training mode with LoRA dropout, the image-free pass has no dropout (same output twice),
    and every module's training flag is restored afterwards."""
    from peft import LoraConfig, get_peft_model

    from dpa_core.image_free import reference_logits
    from dpa_core.modeling import build_llava

    torch.manual_seed(0)
    m, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, init_lora_weights=False,
                                     target_modules=r"model\.language_model\..*\.(q_proj|v_proj|up_proj)"))
    m.train()
    batch = _batch(m.get_base_model(), "alignment_bos")
    pos = position_ids_for(batch["attention_mask"])
    # Dropout is really active in this model's training mode (so the check below can fail).
    with torch.no_grad():
        a = m(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        b = m(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    assert not torch.allclose(a, b)
    for queries in (None, batch["input_ids"] == m.get_base_model().config.image_token_id):
        h1, _ = efficient_hidden(m, batch["input_ids"], batch["attention_mask"], pos,
                                 pixel_values=batch["pixel_values"], image_queries=queries)
        h2, _ = efficient_hidden(m, batch["input_ids"], batch["attention_mask"], pos,
                                 pixel_values=batch["pixel_values"], image_queries=queries)
        assert torch.equal(h1, h2)
    for boundary in ("last_text", "image_position"):
        r1, _ = reference_logits(m, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], pos,
                                 boundary=boundary)
        r2, _ = reference_logits(m, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], pos,
                                 boundary=boundary)
        assert torch.equal(r1, r2)
    assert all(mod.training for mod in m.modules())
    # And it equals the pass in eval mode (no dropout), not some other noise-free variant.
    with without_dropout(m):
        h3, _ = efficient_hidden(m, batch["input_ids"], batch["attention_mask"], pos)
    h4, _ = efficient_hidden(m, batch["input_ids"], batch["attention_mask"], pos)
    assert torch.equal(h3, h4)
