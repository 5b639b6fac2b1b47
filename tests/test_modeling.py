"""Model assembly across families, the image-free passes, and padding invariance of the objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel, GPT2Config

from dpa_core.data import Collator, Encoder, MultimodalDataset, Record
from dpa_core.errors import DPAInputError
from dpa_core.image_free import efficient_hidden, reference_logits
from dpa_core.losses import LossConfig
from dpa_core.modeling import build_llava, load_tokenizer, save_connector
from dpa_core.objective import multimodal_loss
from tests.tiny_models import IMAGE_SIZE, PATCH, make_llm

N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16, computed from the tiny CLIP's config by hand
CAPTIONS = ["a red circle on the left", "two yellow circles",
            "the green triangle is above two yellow circles and a blue square"]


def _records(images: Path, turns_for=lambda c: (("user", "<image>\nDescribe."), ("assistant", c))):
    names = sorted(p.name for p in images.glob("*.png"))
    return [Record(f"r{i}", images / names[i], turns_for(c), "mem") for i, c in enumerate(CAPTIONS)]


def _examples(processor, records, mode="plain"):
    enc = Encoder(processor.tokenizer, "<image>", N_IMAGE_TOKENS, 512)
    ds = MultimodalDataset(records, getattr(enc, mode), processor.image_processor)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def sharp(tiny_paths):
    """A tiny Llava re-initialised with large weights, so that its predictions depend strongly on the
    image (a freshly initialised one barely looks at it and every CMO weight sits at the lower bound)."""
    model, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "vision_tower" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0 / p.shape[1] ** 0.5)
    model.eval()
    return model, processor


# --- 8. assembly ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_build_llava_across_families(family, tiny_paths, tmp_path):
    llm = tiny_paths["llm"] if family == "qwen2" else make_llm(tmp_path / "llama", family="llama")
    model, processor = build_llava(tiny_paths["clip"], llm)
    assert model.config.text_config.model_type == family
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id
    assert model.config.text_config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]

    # The pretrained weights are the ones on disk (not a fresh init).
    base = AutoModelForCausalLM.from_pretrained(llm)
    for name, p in base.model.named_parameters():
        if "embed_tokens" in name:
            continue  # grown by one row for <image>
        assert torch.equal(p, model.model.language_model.get_parameter(name)), name
    old_vocab = base.get_input_embeddings().weight.shape[0]
    assert torch.equal(model.get_input_embeddings().weight[:old_vocab], base.get_input_embeddings().weight)
    assert torch.equal(model.lm_head.weight[:old_vocab], base.lm_head.weight)
    vision = CLIPVisionModel.from_pretrained(tiny_paths["clip"])
    for name, p in vision.named_parameters():
        assert torch.equal(p, model.model.vision_tower.get_parameter(name)), name

    # The processor expands one <image> into (image / patch)^2 tokens: the CLS token is dropped.
    from PIL import Image
    img = Image.open(next(tiny_paths["images"].glob("*.png"))).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == N_IMAGE_TOKENS == 16

    # Image features: second-to-last vision layer, CLS dropped, through the connector.
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        assert hs[-2].shape[1] == N_IMAGE_TOKENS + 1  # CLS + patches
        expected = model.model.multi_modal_projector(hs[-2][:, 1:])
        feats = model.model.get_image_features(
            inputs["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
        torch.testing.assert_close(torch.stack(list(feats)), expected)
        assert expected.shape == (1, N_IMAGE_TOKENS, model.config.text_config.hidden_size)
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.logits).all()


def test_llama_keeps_untied_head(tiny_paths, tmp_path):
    model, _ = build_llava(tiny_paths["clip"], make_llm(tmp_path / "llama", family="llama"))
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.config.tie_word_embeddings


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    out = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(out)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def test_build_llava_with_siglip(tiny_siglip, tiny_paths):
    model, processor = build_llava(tiny_siglip, tiny_paths["llm"])
    assert model.config.vision_config.model_type.startswith("siglip")
    assert model.config.vision_feature_select_strategy == "full"  # no CLS to drop
    assert model.config.vision_feature_layer == -2
    from PIL import Image
    img = Image.open(next(tiny_paths["images"].glob("*.png"))).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    inputs = processor(images=img, text=processor.apply_chat_template(msgs, add_generation_prompt=True),
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_IMAGE_TOKENS
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        assert hs[-2].shape[1] == N_IMAGE_TOKENS  # SigLIP has no CLS: all patches are kept
        feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="full").pooler_output
        torch.testing.assert_close(torch.stack(list(feats)), model.model.multi_modal_projector(hs[-2]))
        assert torch.isfinite(model(**inputs).logits).all()
    # Encoder + objective work on it too.
    recs = _records(tiny_paths["images"])[:2]
    batch = Collator(processor.tokenizer.pad_token_id)(_examples(processor, recs))
    with torch.no_grad():
        assert torch.isfinite(multimodal_loss(model, batch, LossConfig("cmo")))


def test_connector_roundtrip(tiny_paths, tmp_path):
    model, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.add_(1.0)
    path = save_connector(model, tmp_path / "connector.safetensors")
    other, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"], connector_path=path)
    for (n, a), (_, b) in zip(model.model.multi_modal_projector.named_parameters(),
                              other.model.multi_modal_projector.named_parameters()):
        assert torch.equal(a, b), n


# --- 7. bad model input ---------------------------------------------------------------------------

def test_unknown_llm_family(tiny_paths, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100).save_pretrained(gpt2)
    with pytest.raises(DPAInputError) as e:
        build_llava(tiny_paths["clip"], gpt2)
    msg = str(e.value)
    assert str(gpt2 / "config.json") in msg and "gpt2" in msg and "Fix:" in msg


def test_unknown_vision_family(tiny_paths):
    with pytest.raises(DPAInputError) as e:
        build_llava(tiny_paths["llm"], tiny_paths["llm"])  # an LLM is no vision tower
    assert str(Path(tiny_paths["llm"]) / "config.json") in str(e.value) and "Fix:" in str(e.value)


def test_tokenizer_without_image_token(tiny_paths):
    with pytest.raises(DPAInputError) as e:
        build_llava(tiny_paths["clip"], tiny_paths["llm"], add_image_token=False)
    msg = str(e.value)
    assert "tokenizer_config.json" in msg and str(tiny_paths["llm"]) in msg and "<image>" in msg
    assert "add_image_token" in msg and "Fix:" in msg
    # With an existing special token named as the image token it works without adding one.
    tok = load_tokenizer(tiny_paths["llm"], "<unk>", add_image_token=False)
    assert tok.convert_tokens_to_ids("<unk>") == tok.unk_token_id


def test_connector_of_another_pair(tiny_paths, tmp_path):
    model, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    path = save_connector(model, tmp_path / "connector.safetensors")
    wide = make_llm(tmp_path / "wide", hidden=48)
    with pytest.raises(DPAInputError) as e:
        build_llava(tiny_paths["clip"], wide, connector_path=path)
    msg = str(e.value)
    assert str(path) in msg and "connector" in msg and "Fix:" in msg


# --- 2. the image-free passes ignore the image -----------------------------------------------------

def _batch(processor, images, side="right", mode="plain"):
    return Collator(processor.tokenizer.pad_token_id, side)(_examples(processor, _records(images), mode))


@pytest.mark.parametrize("side", ["right", "left"])
def test_image_free_passes_ignore_pixels(sharp, tiny_paths, side):
    model, processor = sharp
    batch = _batch(processor, tiny_paths["images"], side, mode="chat")
    other = torch.randn_like(batch["pixel_values"]) * 2
    with torch.no_grad():
        normal_a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"]).logits
        normal_b = model(input_ids=batch["input_ids"], pixel_values=other,
                         attention_mask=batch["attention_mask"]).logits
        ref_a, src_a = reference_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        ref_b, src_b = reference_logits(model, batch["input_ids"], batch["attention_mask"], other)
        hid_a, hsrc_a = efficient_hidden(model, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    after_image = real & (batch["input_ids"] != model.config.image_token_id)
    # The image matters to the normal pass (on the text after the image) ...
    assert (normal_a - normal_b)[after_image].abs().max() > 1e-2
    # ... but not to either image-free pass.
    torch.testing.assert_close(ref_a, ref_b, atol=1e-6, rtol=0)
    assert torch.equal(src_a, src_b) and torch.equal(src_a, hsrc_a)
    # efficient_hidden takes no pixels at all; its lm_head output equals the reference (masking) pass.
    torch.testing.assert_close(model.lm_head(hid_a)[src_a], ref_a[src_a], atol=1e-4, rtol=1e-4)


def test_image_free_matches_a_text_only_run(sharp, tiny_paths):
    """Row t of the image-free pass = the model run on the text tokens only (image removed)."""
    model, processor = sharp
    batch = _batch(processor, tiny_paths["images"], "right", mode="chat")
    image_id = model.config.image_token_id
    with torch.no_grad():
        ref, has = reference_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        for b in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
            n_before = int((ids != image_id).long().cumsum(0)[(ids == image_id).nonzero()[0, 0]])
            text_ids = ids[ids != image_id]
            # The text-only run keeps each token's original position (image positions skipped).
            pos = torch.nonzero(ids != image_id).view(1, -1)
            lm_logits = model.lm_head(model.model.language_model(input_ids=text_ids[None], position_ids=pos)
                                      .last_hidden_state)[0]
            full_pos = torch.nonzero(ids != image_id).view(-1)
            torch.testing.assert_close(ref[b, full_pos], lm_logits, atol=1e-4, rtol=1e-4)
            # image positions take the prediction of the last text token before the image
            first_img = int((ids == image_id).nonzero()[0, 0])
            torch.testing.assert_close(ref[b, first_img], lm_logits[n_before - 1], atol=1e-4, rtol=1e-4)
            assert has[b, : int(batch["attention_mask"][b].sum())].all()


# --- 10. padding side and image-free formulation do not change the loss ------------------------

@pytest.fixture(scope="module")
def self_labelled(sharp, tiny_paths):
    """Per template, three examples whose answers are the sharp model's own greedy continuation given
    the image (forced to 5, 11 and 8 tokens): the model predicts its labels with the image far better
    than without, so CMO deltas spread over the whole clamp range instead of sitting at the bound."""
    from PIL import Image

    model, processor = sharp
    image_id = model.config.image_token_id
    names = sorted(tiny_paths["images"].glob("*.png"))
    out = {}
    for mode in ("plain", "chat"):
        exs = []
        for path, n in zip(names, (5, 11, 8)):
            img = Image.open(path).convert("RGB")
            if mode == "plain":
                text = "<image>"
            else:
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
                text = processor.apply_chat_template(msgs, add_generation_prompt=True)
            inputs = processor(images=img, text=text, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     bad_words_ids=[[image_id]])[0]
            labels = ids.clone()
            labels[: inputs["input_ids"].shape[1]] = -100
            exs.append({"input_ids": ids, "labels": labels, "pixel_values": inputs["pixel_values"][0]})
        out[mode] = exs
    return out


CONFIGS = [
    LossConfig("cmo"),
    LossConfig("cal"),
    LossConfig("cmo", smoothing="per_sequence"),
    LossConfig("cal", smoothing="per_sequence"),
]


@pytest.mark.parametrize("mode", ["plain", "chat"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-{c.smoothing}")
def test_left_and_right_padding_give_the_same_loss(sharp, self_labelled, cfg, mode):
    model, processor = sharp
    exs = self_labelled[mode]
    assert len({len(e["input_ids"]) for e in exs}) == 3  # the last row is not the longest
    values = {}
    with torch.no_grad():
        for side in ("right", "left"):
            batch = Collator(processor.tokenizer.pad_token_id, side)(exs)
            for image_free in ("reference", "efficient"):
                c = LossConfig(**{**cfg.__dict__, "image_free": image_free})
                values[side, image_free] = multimodal_loss(model, batch, c, return_stats=True)
    loss0, stats = values["right", "reference"]
    # The weights are spread out (not all at one bound), so the comparison can fail.
    assert stats["frac_at_min"] < 0.5 and stats["frac_at_max"] < 0.8 and stats["weight_std"] > 0.05
    for key, (loss, _) in values.items():
        assert loss.item() == pytest.approx(loss0.item(), rel=1e-5, abs=1e-6), key
    # and the weighting matters: the result differs from vanilla
    vanilla = multimodal_loss(model, Collator(processor.tokenizer.pad_token_id)(exs), LossConfig("vanilla"))
    assert abs(vanilla.item() - loss0.item()) > 1e-3


def test_per_sequence_batch_loss_combines_its_rows(sharp, tiny_paths):
    """With per-sequence smoothing the loss of a batch is the weight-weighted mix of its rows,
    whatever the padding: check it against running each row alone."""
    model, processor = sharp
    exs = _examples(processor, _records(tiny_paths["images"]), "chat")
    cfg = LossConfig("cmo", delta_min=0.0, delta_max=0.05, smoothing="per_sequence")
    import dpa_core.losses as L

    parts = []
    orig = L.weighted_mean

    def spy(ce, w, target):
        parts.append(((w * ce).sum().item(), w[target].sum().item()))
        return orig(ce, w, target)

    L.weighted_mean = spy
    try:
        with torch.no_grad():
            for e in exs:
                multimodal_loss(model, Collator(processor.tokenizer.pad_token_id)([e]), cfg)
            num = sum(p[0] for p in parts)
            den = sum(p[1] for p in parts)
            batch_loss = multimodal_loss(model, Collator(processor.tokenizer.pad_token_id, "left")(exs), cfg)
    finally:
        L.weighted_mean = orig
    assert batch_loss.item() == pytest.approx(num / (den + 1e-6), rel=1e-5)
