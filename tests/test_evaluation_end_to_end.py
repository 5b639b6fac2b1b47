"""The machinery on a real (random, tiny) Llava checkpoint: batched generation, evaluate_tsv, evaluate_all."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dpa_core.errors import DPAInputError
from dpa_core.evaluation import evaluate_all, evaluate_tsv
from dpa_core.evaluation.generation import GenerationRequest, LlavaGenerator
from dpa_core.evaluation.tsv_benchmark import write_benchmark_tsv
from tests.test_evaluation_lmeval import write_facts
from tests.test_evaluation_vlmeval import toy_rows


@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory):
    return write_benchmark_tsv(toy_rows(6), tmp_path_factory.mktemp("bench") / "toy_mcq.tsv")


def test_batched_generation_equals_one_by_one(tiny_llava_dir):
    """Left padding: a question asked in a batch with longer and shorter prompts gets the same next-token
    scores and the same reply as asked alone. (The random model's reply is always blank, so the
    scores are what tells a padding bug apart.)"""
    gen = LlavaGenerator(tiny_llava_dir, device="cpu")
    assert gen.processor.tokenizer.padding_side == "left"
    img = [Image.new("RGB", (16, 16), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    prompts = ["what colour is it?", "how many shapes are there in the picture, and what colour are they?", "describe"]
    texts = [gen.chat_text(p, 1) for p in prompts]

    def first_scores(idx: list[int]) -> torch.Tensor:
        inputs = gen.processor(text=[texts[i] for i in idx], images=[img[i] for i in idx], return_tensors="pt",
                               padding=True)
        out = gen.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=gen.processor.tokenizer.pad_token_id)
        return out.logits[0]

    batched = first_scores([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(batched[i], first_scores([i])[0], atol=1e-4, rtol=1e-4)
    requests = [GenerationRequest(p, (im,)) for p, im in zip(prompts, img)]
    one_by_one = [gen.generate([r], max_new_tokens=4)[0] for r in requests]
    assert gen.generate(requests, batch_size=3, max_new_tokens=4) == one_by_one


def test_evaluate_tsv_on_tiny_llava(tiny_llava_dir, toy_tsv, tmp_path):
    metrics = evaluate_tsv(tiny_llava_dir, toy_tsv, tmp_path / "out", batch_size=4, max_new_tokens=4, device="cpu")
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"scores.json", "summary.json", "predictions.jsonl"}
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == [str(i) for i in range(6)]
    assert metrics["meta/toy_mcq/n"] == 6
    assert metrics["meta/toy_mcq/n_unparsed"] == sum(p["unparsed"] for p in preds)
    assert metrics["toy_mcq/overall"] == sum(p["correct"] for p in preds) / 6
    assert set(metrics) >= {"toy_mcq/color", "toy_mcq/tint", "toy_mcq/hue"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["max_new_tokens"] == 4 and summary["generation"]["greedy"] is True


@pytest.mark.slow
def test_evaluate_all_merges_and_reports(tiny_llava_dir, toy_tsv, tmp_path):
    """The reference row is this very call: tiny_llava_dir is built from the base models (fresh connector)."""
    facts = write_facts(tmp_path / "facts.jsonl")
    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    benchmarks = [
        {"name": "toy_mcq", "kind": "builtin_tsv", "path": str(toy_tsv), "limit": 4},
        {"name": "mmbench", "kind": "vlmeval", "task": "MMBench_DEV_EN", "optional": True},  # no TSV here: skipped
        {"name": "text_facts", "kind": "lmeval", "path": str(facts)},
    ]
    scores = evaluate_all(tiny_llava_dir, benchmarks, tmp_path / "eval", batch_size=4, max_new_tokens=4,
                          device="cpu", lmu_data=lmu, offline=True)
    out = tmp_path / "eval"
    assert json.loads((out / "scores.json").read_text()) == scores
    assert scores["meta/toy_mcq/n"] == 4 and "toy_mcq/overall" in scores
    assert 0.0 <= scores["text_facts/acc"] <= 1.0 and scores["meta/text_facts/n"] == 8
    assert not any(k.startswith("mmbench/") for k in scores)
    assert scores["meta/evaluate/n_skipped"] == 1
    assert all(isinstance(v, (int, float)) for v in scores.values())
    report = {r["name"]: r for r in json.loads((out / "report.json").read_text())["benchmarks"]}
    assert report["toy_mcq"]["status"] == "ok" and report["text_facts"]["status"] == "ok"
    assert report["mmbench"]["status"] == "skipped" and report["mmbench"]["reason"]
    assert (out / "toy_mcq" / "predictions.jsonl").is_file() and (out / "text_facts" / "samples.jsonl").is_file()


def test_a_missing_benchmark_fails_unless_optional(tiny_llava_dir, tmp_path):
    """A benchmark whose data is not here fails the evaluation (a skipped benchmark cached as a
    success would make arms with different skips look comparable), naming it and the fix."""
    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    with pytest.raises(DPAInputError) as err:
        evaluate_all(tiny_llava_dir, [{"name": "mmbench", "kind": "vlmeval", "task": "MMBench_DEV_EN"}],
                     tmp_path / "eval", device="cpu", lmu_data=lmu, offline=True)
    assert "benchmark 'mmbench' cannot run here" in str(err.value) and "optional: true" in str(err.value)
    assert not (tmp_path / "eval").exists()
    scores = evaluate_all(tiny_llava_dir, [{"name": "mmbench", "kind": "vlmeval", "task": "MMBench_DEV_EN",
                                            "optional": True}], tmp_path / "eval", device="cpu", lmu_data=lmu,
                          offline=True)
    assert scores["meta/evaluate/n_skipped"] == 1 and not any(k.startswith("mmbench/") for k in scores)


def test_evaluate_all_rejects_bad_specs_before_running(tiny_llava_dir, tmp_path):
    with pytest.raises(DPAInputError, match="unknown kind"):
        evaluate_all(tiny_llava_dir, [{"name": "x", "kind": "vqa", "path": "x.tsv"}], tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
