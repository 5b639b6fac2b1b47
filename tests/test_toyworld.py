"""The toy world: layout, determinism, held-out benchmarks, well-formed records, loadable models,
and the measured language prior conflict. One smoke world is built per module; extra builds use
two training steps (the data files do not depend on training)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dpa_core.errors import DPAInputError
from dpa_core.toyworld import build_world, resolve_size
from dpa_core.toyworld.__main__ import main as cli_main
from dpa_core.toyworld.chat import render_chat

FAST = {"llm_steps": 2, "clip_steps": 2}
DATA_GLOBS = ("images/train/*.png", "images/bench/*.png", "captions/*.json", "instruct/*.json",
              "bench/*.tsv", "text_bench/*.jsonl")
LAYOUT = ("images/train", "images/bench", "captions/terse.json", "captions/verbose.json", "instruct/train.json",
          "bench/toy_mcq.tsv", "text_bench/facts.jsonl", "models/llm/config.json", "models/llm/model.safetensors",
          "models/llm/tokenizer.json", "models/clip/config.json", "models/clip/model.safetensors",
          "models/clip/preprocessor_config.json", "metrics/prior_gap.json", "manifest.json")
TRAINING_FILES = ("captions/terse.json", "captions/verbose.json", "instruct/train.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toyworld") / "world"
    build_world(out, "smoke", seed=0)
    return out


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def data_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p.read_bytes()) for g in DATA_GLOBS for p in sorted(root.glob(g))}


def read_tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_layout_and_manifest(world):
    for rel in LAYOUT:
        assert (world / rel).exists(), rel
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["size"] == "smoke"
    assert manifest["counts"]["train_images"] == len(list((world / "images/train").glob("*.png")))
    assert manifest["bytes"]["total"] < 50e6
    assert not [p for p in world.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_same_seed_same_data_bytes_other_seed_other_data(world, tmp_path):
    again = tmp_path / "again"
    build_world(again, "smoke", seed=0, overrides=FAST)
    reference = data_digest(world)
    assert len(reference) > 100
    assert data_digest(again) == reference
    # The CLI, with another seed: other data.
    assert cli_main(["--out", str(tmp_path / "other"), "--size", "smoke", "--seed", "1",
                     "--set", "llm_steps=2", "--set", "clip_steps=2"]) == 0
    other = data_digest(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert sum(other[k] != reference[k] for k in reference) > 0.9 * len(reference)


def test_metrics_are_deterministic(tmp_path):
    a = build_world(tmp_path / "a", "smoke", seed=3, overrides=FAST)
    b = build_world(tmp_path / "b", "smoke", seed=3, overrides=FAST)
    for style, ppl in a["prior_gap_ppl"].items():
        assert b["prior_gap_ppl"][style] == pytest.approx(ppl, rel=1e-4)


def test_benchmarks_are_held_out(world):
    train_png = {sha(p.read_bytes()) for p in (world / "images/train").glob("*.png")}
    bench_png = {sha(p.read_bytes()) for p in (world / "images/bench").glob("*.png")}
    assert bench_png and not train_png & bench_png
    rows = read_tsv(world / "bench/toy_mcq.tsv")
    tsv_png = {sha(base64.b64decode(r["image"])) for r in rows}
    assert tsv_png <= bench_png
    # No training record shows a benchmark image, so no benchmark question+answer is trained
    # on for that image.
    for rel in TRAINING_FILES:
        for rec in json.loads((world / rel).read_text()):
            assert not rec["image"].startswith("bench/")
            assert sha((world / "images" / rec["image"]).read_bytes()) not in tsv_png


def test_training_records_are_well_formed(world):
    from dpa_core.data import load_llava_records  # the pipeline's own validating loader

    ids = set()
    for rel in TRAINING_FILES:
        records = json.loads((world / rel).read_text())
        assert records
        for rec in records:
            assert rec["id"] not in ids
            ids.add(rec["id"])
            assert (world / "images" / rec["image"]).is_file()
            turns = rec["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n") and turns[0]["value"].count("<image>") == 1
            assert all("<image>" not in t["value"] for t in turns[1:])
            assert all(t["value"].strip() for t in turns if t["from"] == "gpt")
        assert len(load_llava_records(world / rel, world / "images")) == len(records)
    assert any(len(r["conversations"]) > 2 for r in json.loads((world / "instruct/train.json").read_text()))


def test_benchmark_formats(world):
    rows = read_tsv(world / "bench/toy_mcq.tsv")
    assert list(rows[0]) == ["index", "image", "question", "A", "B", "C", "D", "answer", "category", "scene_text",
                             "cloze_A", "cloze_B", "cloze_C", "cloze_D"]
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert {r["category"] for r in rows} == {"color", "shape", "position", "count", "relation"}
    for r in rows:
        assert r["answer"] in "ABCD" and len({r[k] for k in "ABCD"}) == 4
        # each cloze answer holds its own option, and the right one is the own-style answer
        assert all(r[k] in r[f"cloze_{k}"] for k in "ABCD") and len({r[f"cloze_{k}"] for k in "ABCD"}) == 4
    with Image.open(io.BytesIO(base64.b64decode(rows[0]["image"]))) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    facts = [json.loads(line) for line in (world / "text_bench/facts.jsonl").read_text().splitlines()]
    assert facts
    for f in facts:
        assert set(f) == {"id", "question", "choices", "answer"}
        assert len(f["choices"]) == 4 and isinstance(f["answer"], int) and 0 <= f["answer"] < 4


def test_models_load_with_plain_transformers(world):
    import torch
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    tok = AutoTokenizer.from_pretrained(world / "models/llm")
    llm = AutoModelForCausalLM.from_pretrained(world / "models/llm")
    assert type(llm).__name__ == "Qwen2ForCausalLM"
    assert "<image>" not in tok.get_vocab()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "what color is the circle?"}, {"role": "assistant", "content": "red."}]
    assert tok.chat_template and tok.apply_chat_template(messages, tokenize=False) == render_chat(messages)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")
    assert llm.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]

    vision = CLIPVisionModel.from_pretrained(world / "models/clip")
    processor = AutoImageProcessor.from_pretrained(world / "models/clip")
    image = Image.open(next((world / "images/bench").glob("*.png"))).convert("RGB")
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        features = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    cfg = vision.config
    assert features.shape == (1, (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)


def test_prior_gap(world):
    gap = json.loads((world / "metrics/prior_gap.json").read_text())
    ppl, uniform = gap["ppl"], gap["uniform_ppl"]
    assert uniform == len(json.loads((world / "models/llm/tokenizer.json").read_text())["model"]["vocab"])
    assert ppl["own_style"] < uniform / 20  # far better than a uniform guess on its own style
    assert ppl["verbose"] > 5 * ppl["own_style"]  # and clearly worse on the verbose style
    assert gap["detail"]["verbose"]["non_content_token_share"] > 0.5


def test_sizes_and_overrides():
    assert resolve_size("smoke", {"llm_steps": 50}).llm_steps == 50
    assert resolve_size("smoke", {"llm_lr": 1}).llm_lr == 1.0  # an int is fine for a float field
    assert resolve_size("default").image_size % resolve_size("default").clip_patch == 0
    for size, overrides in [("huge", None), ("smoke", {"no_such_field": 1}), ("smoke", {"llm_steps": 1.5}),
                            ("smoke", {"image_size": 30}), ("smoke", {"llm_steps": 0}),
                            ("smoke", {"n_llm_florid_docs": -1}), ("smoke", {"llm_first_lessons_steps": 300}),
                            ("smoke", {"llm_first_lessons_steps": -1}), ("smoke", {"llm_scene_recap": 1.5})]:
        with pytest.raises(DPAInputError):
            resolve_size(size, overrides)
    with pytest.raises(DPAInputError):
        build_world("/nonexistent/never", "smoke", seed=-1)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import dpa_core.toyworld.build as build

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during LLM pretraining")

    monkeypatch.setattr(build, "pretrain", boom)
    with pytest.raises(RuntimeError):
        build_world(tmp_path / "world", "smoke", seed=0, overrides=FAST)
    assert list(tmp_path.iterdir()) == []


def test_shipped_base_models_are_reused(world, tmp_path):
    """Base models built once (as the project ships them) give a world whose data equals a full
    build's and whose models are byte copies; another seed or size is refused with the fix."""
    from dpa_core.toyworld import build_base_models

    base = tmp_path / "base"
    shipped = build_base_models(base, "smoke", seed=0, overrides=FAST)
    assert "--base-models-only" in shipped["command"] and len(shipped["fingerprint"]) == 64
    reused = tmp_path / "reused"
    manifest = build_world(reused, "smoke", seed=0, overrides=FAST, base_models=base)
    assert manifest["base_models"]["source"] == str(base)
    assert data_digest(reused) == data_digest(world)
    for rel in ("llm/model.safetensors", "llm/tokenizer.json", "clip/model.safetensors"):
        assert (reused / "models" / rel).read_bytes() == (base / rel).read_bytes()
    # A data-only setting (the style dial) reuses the same models ...
    build_world(tmp_path / "plain", "smoke", seed=0, overrides={**FAST, "verbose_style": 0.0}, base_models=base)
    # ... a setting the models depend on does not.
    for seed, overrides in [(1, FAST), (0, {**FAST, "llm_hidden": 32})]:
        with pytest.raises(DPAInputError, match="built for another world") as err:
            build_world(tmp_path / f"bad{seed}", "smoke", seed=seed, overrides=overrides, base_models=base)
        assert "--base-models-only" in str(err.value)
    with pytest.raises(DPAInputError, match="no base models"):
        build_world(tmp_path / "none", "smoke", seed=0, overrides=FAST, base_models=tmp_path / "missing")
    assert not (tmp_path / "bad1").exists() and not (tmp_path / "none").exists()


def test_verbose_style_dial_keeps_content(tmp_path):
    """The dial removes style words from the verbose captions and nothing else: the content words,
    in order, and every other data file stay the same."""
    import re

    from dpa_core.toyworld.datasets import make_world_data
    from dpa_core.toyworld.scenes import CONTENT_WORDS

    full = make_world_data(resolve_size("smoke"), 0)
    plain = make_world_data(resolve_size("smoke", {"verbose_style": 0.0}), 0)
    half = make_world_data(resolve_size("smoke", {"verbose_style": 0.5}), 0)

    def words(rec):
        return re.findall(r"[a-z]+", rec["conversations"][1]["value"].lower())

    assert plain.captions["terse"] == full.captions["terse"] and plain.instruct == full.instruct
    assert plain.bench_rows == full.bench_rows
    style_words = {"behold", "verily", "forsooth", "doth", "resplendent", "majesty", "canvas", "marvel", "splendour"}
    n_style = {}
    for name, data in (("full", full), ("half", half), ("plain", plain)):
        n_style[name] = sum(w in style_words for r in data.captions["verbose"] for w in words(r))
        for a, b in zip(data.captions["verbose"], full.captions["verbose"]):
            assert [w for w in words(a) if w in CONTENT_WORDS] == [w for w in words(b) if w in CONTENT_WORDS]
    assert n_style["plain"] == 0 < n_style["half"] < n_style["full"]
    with pytest.raises(DPAInputError):
        resolve_size("smoke", {"verbose_style": 1.5})


def test_first_lessons_corpus_and_phase(tmp_path):
    """The first-lessons corpus holds one-object scenes only; the LLM's
    first llm_first_lessons_steps steps draw every window from it, the rest from the main corpus;
    at 0 (the shipped models' value) the fingerprint is the one computed before the field existed."""
    import dataclasses
    import random

    import torch

    from dpa_core.toyworld import build as build_mod
    from dpa_core.toyworld.corpus import first_lessons
    from dpa_core.toyworld.datasets import make_world_data
    from dpa_core.toyworld.llm import Corpus, make_llm, pretrain, tokenized_corpus
    from dpa_core.toyworld.scenes import COLORS

    ws = resolve_size("smoke", {"llm_steps": 4, "llm_first_lessons_steps": 2, "llm_batch": 2})
    data = make_world_data(ws, 0)
    bench = {s.key() for s in data.bench}
    docs = first_lessons(ws, random.Random(0), bench)
    assert docs and all(d.endswith("<|endoftext|>") for d in docs)
    for d in docs:  # one object: exactly one colour word in each description
        scene = d.split("<|im_start|>user\n")[1].split("\n")[0] if "<|im_start|>" in d else d
        said = {c for c in COLORS if f" {c} " in f" {scene} "}
        assert len(said) == 1, d

    # which corpus each step's windows came from: the two corpora use disjoint token ids here
    tok = build_mod.train_tokenizer(["a b c d e f g h"], 300, 512)
    main = Corpus(torch.full((400,), 10), torch.arange(0, 400, 40), torch.ones(400, dtype=torch.bool))
    lessons = Corpus(torch.full((400,), 11), torch.arange(0, 400, 40), torch.ones(400, dtype=torch.bool))
    seen = []
    model = make_llm(ws, tok)
    forward = model.forward
    model.forward = lambda input_ids, labels: (seen.append(int(input_ids[0, 0])), forward(input_ids=input_ids, labels=labels))[1]
    stats = pretrain(model, main, ws, 0, first_lessons=lessons)
    assert seen == [11, 11, 10, 10] and stats["first_lessons_tokens"] == 400
    with pytest.raises(ValueError, match="first_lessons"):
        pretrain(make_llm(ws, tok), main, ws, 0)

    # the field at 0 leaves the fingerprint as it was; any other value changes it
    plain = resolve_size("smoke")
    legacy = {k: v for k, v in dataclasses.asdict(plain).items()
              if k not in build_mod.DATA_ONLY_FIELDS and k not in ("llm_first_lessons_steps", "llm_scene_recap")}
    import hashlib
    want = hashlib.sha256(json.dumps({"seed": 0, "settings": legacy, "bench_keys": sorted(repr(k) for k in bench)},
                                     sort_keys=True).encode()).hexdigest()
    assert build_mod.base_fingerprint(plain, 0, data.bench) == want
    lesson_ws = dataclasses.replace(plain, llm_first_lessons_steps=10)
    assert build_mod.base_fingerprint(lesson_ws, 0, data.bench) != want
    assert build_mod.base_fingerprint(dataclasses.replace(plain, llm_scene_recap=0.5), 0, data.bench) != want
    assert tokenized_corpus(tok, ["a b<|endoftext|>"]).loss_mask.all()


def test_reading_probe_in_checks_and_learning_curve(world, tmp_path):
    """The world's checks say how well the base LLM reads a scene told in words (overall, per
    category, per object count); a base-model build with probe_every records the learning curve,
    and probing leaves the models byte for byte as a build without it."""
    from dpa_core.toyworld import build_base_models

    reading = json.loads((world / "manifest.json").read_text())["checks"]["scene_text_reading_base_llm"]
    assert {"overall", "color", "shape", "position", "count"} <= reading.keys()
    assert any(k.startswith("n") and k[1:].isdigit() for k in reading)
    assert all(0.0 <= v <= 1.0 for v in reading.values())

    plain = build_base_models(tmp_path / "plain", "smoke", seed=0, overrides={**FAST, "llm_steps": 4})
    probed = build_base_models(tmp_path / "probed", "smoke", seed=0, overrides={**FAST, "llm_steps": 4}, probe_every=2)
    assert "llm_reading_curve" not in plain
    assert [c["step"] for c in probed["llm_reading_curve"]] == [2, 4]
    for rel in ("llm/model.safetensors", "clip/model.safetensors"):
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "probed" / rel).read_bytes(), rel


def test_scene_recaps_tell_the_same_scene_twice():
    """llm_scene_recap: that share of the plain scene documents is the full description, then the same
    scene told again in an own-style form; at 0 the corpus is the one without the field (no random
    number drawn), so the shipped models' corpus is unchanged."""
    import random

    from dpa_core.toyworld.corpus import llm_corpus
    from dpa_core.toyworld.datasets import make_world_data
    from dpa_core.toyworld.scenes import COLORS, SHAPES

    ws = resolve_size("smoke", {"n_llm_chat_docs": 1, "n_llm_fact_docs": 1})
    data = make_world_data(ws, 0)
    bench = {s.key() for s in data.bench}
    plain = llm_corpus(ws, random.Random(0), data.people, bench)
    full = llm_corpus(resolve_size(ws, {"llm_scene_recap": 1.0}), random.Random(0), data.people, bench)
    half = llm_corpus(resolve_size(ws, {"llm_scene_recap": 0.5}), random.Random(0), data.people, bench)

    def recaps(docs):
        return [d.removesuffix("<|endoftext|>").split("\n") for d in docs
                if "\n" in d and "<|im_start|>" not in d]

    assert not recaps(plain)
    told_twice = recaps(full)
    assert len(told_twice) == ws.n_llm_scene_docs
    for first, second in told_twice:
        assert first.startswith(("there is one shape.", "there are ")) and " is at the " in first
        words = lambda t: {w for w in t.replace(".", " ").replace(",", " ").replace(":", " ").split()
                           if w in COLORS or w in SHAPES}
        assert words(second) == words(first)  # the same objects, told again
    assert 0.4 * ws.n_llm_scene_docs < len(recaps(half)) < 0.6 * ws.n_llm_scene_docs
