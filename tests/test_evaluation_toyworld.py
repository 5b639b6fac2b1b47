"""The evaluators on the toy world's own benchmarks and models (what the pipeline runs): the
bootstrapped LLM beats chance on the text benchmark; the reference row (base models, fresh connector)
is scored end to end with one evaluate_all call."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dpa_core.evaluation import evaluate_all, evaluate_lmeval
from dpa_core.evaluation.tsv_benchmark import MCQ, read_tsv_benchmark

toyworld = pytest.importorskip("dpa_core.toyworld", reason="the toy world is not in this checkout")
pytestmark = pytest.mark.slow  # building the smoke world trains its LLM and CLIP


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A smoke world, seed 0; DPA_TEST_WORLD names an already built one to reuse (minutes saved)."""
    prebuilt = os.environ.get("DPA_TEST_WORLD")
    if prebuilt and (Path(prebuilt) / "manifest.json").is_file():
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("world") / "world"
    toyworld.build_world(out, "smoke", seed=0)
    return out


def test_toy_mcq_tsv_reads(world):
    bench = read_tsv_benchmark(world / "bench" / "toy_mcq.tsv")
    manifest = json.loads((world / "manifest.json").read_text())
    assert bench.kind == MCQ and len(bench.items) == manifest["counts"]["bench_rows"]
    assert {it.category for it in bench.items} == set(manifest["counts"]["bench_rows_per_category"])
    assert all(it.images_b64 and it.answer in it.options for it in bench.items)


# The toy LLM answers in sentences ("pomem lives in marn."): score each choice as that sentence.
SENTENCE_STEMS = ((r"where does (\w+) live\?", "{} lives in "), (r"what food does (\w+) like\?", "{} likes "),
                  (r"what pet does (\w+) have\?", "{} has a pet "))


def as_sentences(facts: Path, out: Path) -> Path:
    records = [json.loads(line) for line in facts.read_text().splitlines() if line.strip()]
    for rec in records:
        for pattern, stem in SENTENCE_STEMS:
            if m := re.fullmatch(pattern, rec["question"]):
                rec["choice_prefix"], rec["choice_suffix"] = stem.format(m.group(1)), "."
        assert "choice_prefix" in rec, rec["question"]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_base_llm_beats_chance_on_facts(world, tmp_path):
    """facts.jsonl as the pipeline scores it (default prompt: the bare question)."""
    metrics = evaluate_lmeval(world / "models" / "llm", tmp_path / "out", name="text_facts",
                              path=world / "text_bench" / "facts.jsonl", offline=True, device="cpu")
    assert metrics["text_facts/acc"] > 0.25  # four choices


def test_base_llm_beats_chance_in_chat_form(world, tmp_path):
    """Asked in chat form and scored as full answer sentences, as the toy world's own check does
    (on the smoke world, seed 0, both gave 0.5 when this was written)."""
    facts = as_sentences(world / "text_bench" / "facts.jsonl", tmp_path / "facts_sentences.jsonl")
    metrics = evaluate_lmeval(world / "models" / "llm", tmp_path / "out", name="text_facts", path=facts,
                              prompt="chat", offline=True, device="cpu")
    assert metrics["text_facts/acc"] > 0.25


def test_reference_row(world, tmp_path):
    from dpa_core.modeling import build_llava, save_llava

    model_dir = save_llava(*build_llava(world / "models" / "clip", world / "models" / "llm"), tmp_path / "reference")
    scores = evaluate_all(model_dir, [
        {"name": "toy_mcq", "kind": "builtin_tsv", "path": str(world / "bench" / "toy_mcq.tsv")},
        {"name": "text_facts", "kind": "lmeval", "path": str(world / "text_bench" / "facts.jsonl")},
    ], tmp_path / "eval", batch_size=16, max_new_tokens=8, device="cpu", offline=True)
    n = json.loads((world / "manifest.json").read_text())["counts"]["bench_rows"]
    assert scores["meta/toy_mcq/n"] == n and 0.0 <= scores["toy_mcq/overall"] <= 1.0
    assert {"toy_mcq/color", "toy_mcq/shape", "text_facts/acc"} <= set(scores)
    # The LLM inside the Llava checkpoint scores as the base LLM alone does.
    alone = evaluate_lmeval(world / "models" / "llm", tmp_path / "alone", name="text_facts",
                            path=world / "text_bench" / "facts.jsonl", offline=True, device="cpu")
    assert scores["text_facts/acc"] == alone["text_facts/acc"]
