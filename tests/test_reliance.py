"""The image-reliance diagnostic on real tiny models: per-token log-probability gain from the image,
split into content and style tokens."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dpa_core.data import Collator, Encoder, MultimodalDataset, load_llava_records
from dpa_core.errors import DPAInputError
from dpa_core.image_free import reference_logits
from dpa_core.losses import IGNORE_INDEX
from dpa_core.modeling import build_llava, save_connector
from dpa_core.reliance import (CaptionSet, connector_reliance, content_flags, flat_reliance, image_reliance,
                               load_content_words, text_oracle_reliance, token_classes, token_reliance)
from dpa_core.stages import ModelPaths, load_proxy_llm

CAPTIONS = ["a red circle and a small blue square.", "Verily, a large green triangle doth gleam at the top left!",
            "describe the image briefly. a small purple square at the bottom right."]
WORDS = ["red", "blue", "green", "purple", "circle", "square", "triangle", "small", "large", "top left",
         "bottom right"]


def write_heldout(d, image_root, words, scene_texts=None):
    """CAPTIONS as a held-out caption set in d (record i carries scene_texts[i] where given) and the word file."""
    images = sorted(p.name for p in image_root.iterdir())
    records = [{"id": f"h{i}", "image": images[i], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": c}]}
        | ({"scene_text": scene_texts[i]} if scene_texts and scene_texts.get(i) else {})
        for i, c in enumerate(CAPTIONS)]
    (d / "captions.json").write_text(json.dumps(records))
    (d / "words.json").write_text(json.dumps(words))
    return CaptionSet("mixed", d / "captions.json", image_root), d / "words.json"


@pytest.fixture(scope="module")
def captions(tiny_paths, tmp_path_factory):
    return write_heldout(tmp_path_factory.mktemp("heldout"), tiny_paths["images"], WORDS)


@pytest.fixture(scope="module")
def llava(tiny_paths):
    torch.manual_seed(0)
    model, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    return model.eval(), processor


def test_content_flags_follow_the_words(llava):
    tok = llava[1].tokenizer
    caption = "Verily, a large green triangle doth gleam!"
    flags = content_flags(tok, caption, frozenset(w for entry in WORDS for w in entry.split()))
    enc = tok(caption, add_special_tokens=False, return_offsets_mapping=True)
    flagged = "".join(caption[s:e] for (s, e), f in zip(enc["offset_mapping"], flags) if f).replace(" ", "")
    assert flagged == "largegreentriangle"
    assert len(flags) == len(enc["input_ids"])


def test_token_reliance_matches_the_masked_reference(llava, captions):
    """r = log p(y | image, prefix) - log p(y | prefix) from the text-only pass equals the same quantity
    from full logits of the image pass and the mask-based image-free pass."""
    model, processor = llava
    cs, _ = captions
    records = load_llava_records(cs.path, cs.image_root)
    enc = Encoder(processor.tokenizer, "<image>", 16, 128)  # tiny CLIP: 16 image tokens
    batch = Collator(processor.tokenizer.pad_token_id)([MultimodalDataset(records, enc.plain, processor.image_processor)[i]
                                                        for i in range(3)])
    r, valid = token_reliance(model, batch)
    with torch.no_grad():
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], position_ids=pos).logits[:, :-1].float().log_softmax(-1)
        free, has_source = reference_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], pos)
        free = free[:, :-1].float().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    target = labels != IGNORE_INDEX
    assert torch.equal(valid, target & has_source[:, :-1])
    assert valid.sum() > 10
    lab = labels.clamp(min=0)[..., None]
    want = (full.gather(-1, lab) - free.gather(-1, lab)).squeeze(-1)
    torch.testing.assert_close(r[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert (r[~valid] == 0).all()
    assert r[valid].abs().max() > 1e-4  # the random connector does change the predictions


def test_image_reliance_means_and_counts(llava, captions):
    model, processor = llava
    cs, words_file = captions
    words = load_content_words(words_file)
    res = image_reliance(model, processor, [cs], num_image_tokens=16, content_words=words, batch_size=2)["mixed"]
    assert res["n_captions"] == 3
    assert res["n_tokens_all"] == res["n_tokens_content"] + res["n_tokens_style"]
    assert res["n_tokens_content"] > 0 and res["n_tokens_style"] > 0
    mean_all = (res["content"] * res["n_tokens_content"] + res["style"] * res["n_tokens_style"]) / res["n_tokens_all"]
    assert res["all"] == pytest.approx(mean_all)
    # batch size does not change the numbers
    again = image_reliance(model, processor, [cs], num_image_tokens=16, content_words=words, batch_size=3)["mixed"]
    assert again == pytest.approx(res, abs=1e-5)
    # without a word list: the all-token mean only
    plain = image_reliance(model, processor, [cs], num_image_tokens=16, content_words=None, batch_size=2)["mixed"]
    assert "content" not in plain and plain["all"] == pytest.approx(res["all"], abs=1e-5)
    assert not any(k.startswith("content/") for k in res)  # a plain word list has no classes
    flat = flat_reliance({"mixed": res})
    assert flat["reliance/mixed/content"] == res["content"]


@pytest.mark.parametrize("text,message", [("{", "not valid JSON"), ('["red", 3]', "non-empty strings"), ("[]", "non-empty")])
def test_bad_word_list(tmp_path, text, message):
    (tmp_path / "w.json").write_text(text)
    with pytest.raises(DPAInputError, match=message) as err:
        load_content_words(tmp_path / "w.json")
    assert "w.json" in str(err.value) and "Fix:" in str(err.value)


def test_connector_reliance_uses_the_proxy_llm(tiny_paths, captions, tmp_path):
    """Proxy arms are measured with the proxy LLM they were aligned against, plain arms with the base LLM."""
    cs, words_file = captions
    torch.manual_seed(0)
    model, _ = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    connector = save_connector(model, tmp_path / "connector.safetensors")
    torch.manual_seed(1)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_paths["llm"]),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    paths = ModelPaths(tiny_paths["clip"], tiny_paths["llm"])
    kw = dict(content_words_file=words_file, batch_size=2, device="cpu")
    base = connector_reliance(paths, connector, [cs], **kw)["mixed"]
    proxy = connector_reliance(paths, connector, [cs], proxy_adapter=tmp_path / "adapter", **kw)["mixed"]
    assert proxy["all"] != pytest.approx(base["all"], abs=1e-6)
    built, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"], connector_path=connector,
                                   language_model=load_proxy_llm(tiny_paths["llm"], tmp_path / "adapter"))
    direct = image_reliance(built, processor, [cs], num_image_tokens=16, content_words=load_content_words(words_file),
                            batch_size=2)["mixed"]
    assert proxy == pytest.approx(direct, abs=1e-5)


CLASSES = {"colour": ["red", "blue", "green", "purple"], "shape": ["circle", "square", "triangle"],
           "where": ["top left", "bottom right"], "size": ["small", "large"]}
SCENES = ["a red circle. a small blue square.", "a large green triangle at the top left.",
          "a small purple square at the bottom right."]


@pytest.fixture(scope="module")
def with_scenes(tiny_paths, tmp_path_factory):
    """The held-out captions with the scene in words on two of the three records, and a word-class file."""
    return write_heldout(tmp_path_factory.mktemp("heldout_scenes"), tiny_paths["images"], CLASSES,
                         {0: SCENES[0], 2: SCENES[2]})


def test_word_classes_split_the_content_mean(llava, with_scenes):
    model, processor = llava
    cs, classes_file = with_scenes
    words = load_content_words(classes_file)
    assert words["top"] == words["left"] == "where" and words["red"] == "colour"
    tok = processor.tokenizer
    caption = "Verily, a large green triangle doth gleam!"
    enc = tok(caption, add_special_tokens=False, return_offsets_mapping=True)
    spelled = {c: "".join(caption[s:e] for (s, e), k in zip(enc["offset_mapping"], token_classes(tok, caption, words))
                          if k == c).strip() for c in ("size", "colour", "shape")}
    assert spelled == {"size": "large", "colour": "green", "shape": "triangle"}
    res = image_reliance(model, processor, [cs], num_image_tokens=16, content_words=words, batch_size=2)["mixed"]
    classes = [k.removeprefix("content/") for k in res if k.startswith("content/")]
    assert set(classes) == {"colour", "shape", "where", "size"}
    assert sum(res[f"n_tokens_content/{c}"] for c in classes) == res["n_tokens_content"]
    weighted = sum(res[f"content/{c}"] * res[f"n_tokens_content/{c}"] for c in classes) / res["n_tokens_content"]
    assert res["content"] == pytest.approx(weighted)
    # the same words as a plain list give the same content mean
    flat_words = load_content_words(classes_file).keys()
    assert content_flags(tok, caption, flat_words) == [c is not None for c in token_classes(tok, caption, words)]


def test_a_word_in_two_classes_is_refused(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"colour": ["red"], "hue": ["red", "blue"]}))
    with pytest.raises(DPAInputError, match="two classes") as err:
        load_content_words(tmp_path / "c.json")
    assert "c.json" in str(err.value) and "Fix:" in str(err.value)
    (tmp_path / "e.json").write_text(json.dumps({"colour": []}))
    with pytest.raises(DPAInputError, match="in class 'colour'"):
        load_content_words(tmp_path / "e.json")


def test_text_oracle_is_the_llm_reading_the_scene_in_words(tiny_paths, llava, with_scenes):
    """o_j = log p(y_j | scene text, prefix) - log p(y_j | prefix), recomputed here with the bare causal LM
    token by token; records without a scene text are left out; the image does not enter."""
    model, processor = llava
    cs, classes_file = with_scenes
    words = load_content_words(classes_file)
    res = image_reliance(model, processor, [cs], num_image_tokens=16, content_words=words, batch_size=2)
    oracle = res["text_oracle/mixed"]
    assert oracle["n_captions"] == 2
    lm = AutoModelForCausalLM.from_pretrained(tiny_paths["llm"]).eval()
    tok = processor.tokenizer
    assert getattr(tok, "bos_token_id", None) is None  # Qwen-style: the first caption token has no prefix
    values, kinds = [], []
    for i in (0, 2):
        ids = tok(CAPTIONS[i], add_special_tokens=False)["input_ids"]
        ctx = tok(SCENES[i] + "\n", add_special_tokens=False)["input_ids"]
        for j in range(1, len(ids)):
            with torch.no_grad():
                a = lm(torch.tensor([ctx + ids[:j]])).logits[0, -1].log_softmax(-1)[ids[j]]
                b = lm(torch.tensor([ids[:j]])).logits[0, -1].log_softmax(-1)[ids[j]]
            values.append(float(a - b))
        kinds += token_classes(tok, CAPTIONS[i], words)[1:]
    assert oracle["n_tokens_all"] == len(values) and oracle["n_tokens_without_prefix"] == 2
    assert oracle["all"] == pytest.approx(sum(values) / len(values), abs=1e-4)
    colour = [v for v, k in zip(values, kinds) if k == "colour"]
    assert oracle["content/colour"] == pytest.approx(sum(colour) / len(colour), abs=1e-4)
    # the bare LM gives the same numbers as the Llava model it sits in (no image anywhere)
    again = text_oracle_reliance(lm, tok, load_llava_records(cs.path, cs.image_root),
                                 {"h0": SCENES[0], "h2": SCENES[2]}, words)
    assert again == pytest.approx(oracle, abs=1e-4)
    assert text_oracle_reliance(lm, tok, load_llava_records(cs.path, cs.image_root), {}, words) is None
    assert flat_reliance(res)["reliance/text_oracle/mixed/all"] == oracle["all"]
