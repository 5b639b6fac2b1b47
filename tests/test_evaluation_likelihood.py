"""Likelihood scoring of multiple choice and the text-oracle ceiling, on real tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dpa_core.errors import DPAInputError
from dpa_core.evaluation import evaluate_text_oracle, evaluate_tsv
from dpa_core.evaluation.generation import GenerationRequest, LlavaGenerator, TextChatModel, mcq_prompt
from dpa_core.evaluation.tsv_benchmark import write_benchmark_tsv
from tests.test_evaluation_vlmeval import toy_rows

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
PROMPTS = ["what colour is it?", "how many shapes are there in the picture, and what colour are they?", "describe",
           "is the red circle left of the blue square or above it, or neither of the two?"]


def mcq_requests(n_images: int = 1) -> list[GenerationRequest]:
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 0)]
    return [GenerationRequest(mcq_prompt(p, OPTIONS), tuple(Image.new("RGB", (16, 16), c) for _ in range(n_images)))
            for p, c in zip(PROMPTS, colours)]


def reference_letter_logprobs(gen, request: GenerationRequest) -> dict[str, float]:
    """One request alone, no padding, the full logits of a plain forward: the last position's
    log-softmax at each letter's token."""
    inputs = gen._encode([request])
    with torch.no_grad():
        logits = gen.model(**inputs).logits[0, -1].float()
    logp = logits.log_softmax(-1)
    return {k: float(logp[gen.tokenizer(k, add_special_tokens=False)["input_ids"][0]]) for k in OPTIONS}


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return LlavaGenerator(tiny_llava_dir, device="cpu")


def test_likelihood_picks_the_letter_with_the_highest_logit(llava):
    requests = mcq_requests()
    found = llava.option_logprobs(requests, [list(OPTIONS)] * len(requests), batch_size=4)
    for request, got in zip(requests, found):
        want = reference_letter_logprobs(llava, request)
        assert got == pytest.approx(want, abs=1e-4)
        assert max(got, key=got.get) == max(want, key=want.get)
    # the random model does not prefer one letter everywhere, or the test could not tell rows apart
    assert len({tuple(sorted(g, key=g.get)) for g in found}) > 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_likelihood_does_not_depend_on_batching_or_padding(llava, side):
    requests = mcq_requests()
    letters = [list(OPTIONS)] * len(requests)
    alone = [llava.option_logprobs([r], [list(OPTIONS)], batch_size=1)[0] for r in requests]
    old = llava.tokenizer.padding_side
    llava.tokenizer.padding_side = side
    try:
        batched = llava.option_logprobs(requests, letters, batch_size=4)
        inputs = llava._encode(requests)
        assert (inputs["attention_mask"] == 0).any(), "the prompts must differ in length, so the batch is padded"
    finally:
        llava.tokenizer.padding_side = old
    for a, b in zip(alone, batched):
        assert a == pytest.approx(b, abs=1e-4)


def test_evaluate_tsv_scores_both_modes(tiny_llava_dir, tmp_path):
    tsv = write_benchmark_tsv(toy_rows(8), tmp_path / "toy_mcq.tsv")
    metrics = evaluate_tsv(tiny_llava_dir, tsv, tmp_path / "out", batch_size=3, max_new_tokens=3, device="cpu")
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["lik_correct"] == (p["lik_choice"] == p["answer"]) for p in preds)
    assert all(p["lik_choice"] == max(p["lik_logprobs"], key=p["lik_logprobs"].get) for p in preds)
    assert metrics["toy_mcq/lik/overall"] == pytest.approx(sum(p["lik_correct"] for p in preds) / 8)
    assert metrics["toy_mcq/overall"] == pytest.approx(sum(p["correct"] for p in preds) / 8)
    for cat in ("color", "tint", "hue"):
        rows = [p for p in preds if p["category"] == cat]
        assert metrics[f"toy_mcq/lik/{cat}"] == pytest.approx(sum(p["lik_correct"] for p in rows) / len(rows))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["likelihood"]["overall"] == metrics["toy_mcq/lik/overall"]
    # the same letters the generator computes for these prompts
    gen = LlavaGenerator(tiny_llava_dir, device="cpu")
    from dpa_core.evaluation.builtin_scorer import benchmark_requests
    from dpa_core.evaluation.tsv_benchmark import read_tsv_benchmark

    bench = read_tsv_benchmark(tsv)
    direct = gen.option_logprobs(benchmark_requests(bench), [list(it.options) for it in bench.items], batch_size=8)
    assert [max(d, key=d.get) for d in direct] == [p["lik_choice"] for p in preds]


class ScriptedLetters:
    """Generation and letter log-probabilities scripted per request (a unit test of the oracle's prompts)."""

    def __init__(self, replies, favourites):
        self.replies, self.favourites, self.requests = replies, favourites, []

    def __call__(self, requests, **kwargs):
        self.requests = list(requests)
        return self.replies[: len(requests)]

    def option_logprobs(self, requests, letters, **kwargs):
        return [{k: (0.0 if k == fav else -5.0) for k in row} for row, fav in zip(letters, self.favourites)]


def scene_rows(n: int = 4) -> list[dict]:
    rows = toy_rows(n)
    for r in rows:
        r.pop("image")
        r["scene_text"] = f"there is one shape. a large {OPTIONS['ABCD'[r['index'] % 4]]} circle is at the center."
    return rows


def test_text_oracle_prompt_is_scene_then_the_mllm_prompt(tmp_path):
    tsv = write_benchmark_tsv(scene_rows(), tmp_path / "toy_mcq.tsv")
    gen = ScriptedLetters(["A", "C", "C", "nonsense"], favourites=["A", "B", "C", "A"])
    metrics = evaluate_text_oracle(None, tsv, tmp_path / "out", generator=gen)
    first = gen.requests[0]
    assert first.prompt == ("there is one shape. a large red circle is at the center.\n"
                            + mcq_prompt("Picture 0: what colour fills it?", OPTIONS))
    assert first.image_list() == []
    assert metrics["toy_mcq/overall"] == pytest.approx(2 / 4)  # A right, C wrong, C right, unparsed
    assert metrics["toy_mcq/lik/overall"] == pytest.approx(3 / 4)  # A, B, C right; A for D wrong


def test_text_oracle_needs_scene_text(tmp_path):
    rows = scene_rows()
    rows[2]["scene_text"] = ""
    tsv = write_benchmark_tsv(rows, tmp_path / "toy_mcq.tsv")
    with pytest.raises(DPAInputError, match="no scene_text") as err:
        evaluate_text_oracle(None, tsv, tmp_path / "out", generator=ScriptedLetters([""] * 4, ["A"] * 4))
    assert "toy_mcq.tsv" in str(err.value) and "'2'" in str(err.value)


def test_text_oracle_with_the_real_llm(tiny_paths, tmp_path):
    tsv = write_benchmark_tsv(scene_rows(4), tmp_path / "toy_mcq.tsv")
    metrics = evaluate_text_oracle(tiny_paths["llm"], tsv, tmp_path / "out", batch_size=3, max_new_tokens=3,
                                   device="cpu")
    assert {"toy_mcq/overall", "toy_mcq/lik/overall", "meta/toy_mcq/n"} <= set(metrics)
    model = TextChatModel(tiny_paths["llm"], device="cpu")
    req = GenerationRequest("there is one shape.\n" + mcq_prompt("q?", OPTIONS))
    alone = model.option_logprobs([req], [list(OPTIONS)])[0]
    assert alone == pytest.approx(reference_letter_logprobs(model, req), abs=1e-4)


def test_text_chat_model_asks_the_lm_it_is_given(tiny_paths, tmp_path):
    """The proxy LLM is asked in memory (the base LLM's tokenizer, its own weights): the same answers as
    that LM saved and loaded, not the directory's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    changed = AutoModelForCausalLM.from_pretrained(tiny_paths["llm"])
    with torch.no_grad():
        for weight in changed.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    changed.save_pretrained(tmp_path / "changed")
    AutoTokenizer.from_pretrained(tiny_paths["llm"]).save_pretrained(tmp_path / "changed")
    req = GenerationRequest("there is one shape.\n" + mcq_prompt("q?", OPTIONS))
    given = TextChatModel(tiny_paths["llm"], device="cpu", model=changed).option_logprobs([req], [list(OPTIONS)])[0]
    saved = TextChatModel(tmp_path / "changed", device="cpu").option_logprobs([req], [list(OPTIONS)])[0]
    own = TextChatModel(tiny_paths["llm"], device="cpu").option_logprobs([req], [list(OPTIONS)])[0]
    assert given == pytest.approx(saved, abs=1e-5)
    assert max(abs(given[k] - own[k]) for k in OPTIONS) > 1e-3


# ---- cloze: each option's full answer scored by likelihood, no letters ---------------------------

CLOZE = {k: f"the circle is {v}." for k, v in OPTIONS.items()}


def reference_reply_logprob(gen, request: GenerationRequest, reply: str) -> float:
    """One request alone, no padding: the prompt's generation prompt, then the reply, summed
    log-probabilities of the reply's tokens from a plain forward over the whole text."""
    full = gen._encode([GenerationRequest(request.prompt, request.images, request.load_images, reply=reply)])
    n = len(gen.tokenizer(reply, add_special_tokens=False)["input_ids"])
    ids = full["input_ids"][0]
    with torch.no_grad():
        logp = gen.model(**full).logits[0].float().log_softmax(-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))))


@pytest.mark.parametrize("side", ["left", "right"])
def test_cloze_sums_the_reply_tokens_whatever_the_batching(llava, side):
    requests = [GenerationRequest(p, r.images) for p, r in zip(PROMPTS, mcq_requests())]
    old = llava.tokenizer.padding_side
    llava.tokenizer.padding_side = side
    try:
        if side == "right":  # the reply must end every row: right padding is refused, not misread
            with pytest.raises(ValueError, match="left padding"):
                llava.reply_logprobs(requests, [CLOZE] * len(requests), batch_size=8)
            return
        batched = llava.reply_logprobs(requests, [CLOZE] * len(requests), batch_size=8)
    finally:
        llava.tokenizer.padding_side = old
    for request, got in zip(requests, batched):
        want = {k: reference_reply_logprob(llava, request, text) for k, text in CLOZE.items()}
        assert got == pytest.approx(want, abs=1e-3)
    assert len({max(g, key=g.get) for g in batched} | {min(g, key=g.get) for g in batched}) > 1


def cloze_rows(n: int = 4) -> list[dict]:
    rows = scene_rows(n)
    for r in rows:
        r.update({f"cloze_{k}": text for k, text in CLOZE.items()})
    return rows


class ScriptedCloze(ScriptedLetters):
    def __init__(self, replies, favourites, cloze_favourites):
        super().__init__(replies, favourites)
        self.cloze_favourites, self.cloze_requests = cloze_favourites, []

    def reply_logprobs(self, requests, replies, **kwargs):
        self.cloze_requests = list(requests)
        return [{k: (0.0 if k == fav else -3.0) for k in row} for row, fav in zip(replies, self.cloze_favourites)]


def test_cloze_is_a_third_score_with_the_plain_question(tmp_path):
    tsv = write_benchmark_tsv(cloze_rows(), tmp_path / "toy_mcq.tsv")
    gen = ScriptedCloze(["A", "C", "C", "nonsense"], favourites=["A", "B", "C", "A"], cloze_favourites=["A", "B", "D", "D"])
    metrics = evaluate_text_oracle(None, tsv, tmp_path / "out", generator=gen)
    # the scene, then the bare question: no options, no letter instruction
    assert gen.cloze_requests[0].prompt == "there is one shape. a large red circle is at the center.\nPicture 0: what colour fills it?"
    assert metrics["toy_mcq/cloze/overall"] == pytest.approx(3 / 4)  # A, B right; D for C wrong; D right
    assert metrics["toy_mcq/lik/overall"] == pytest.approx(3 / 4)
    assert metrics["toy_mcq/overall"] == pytest.approx(2 / 4)
    preds = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert [p["cloze_choice"] for p in preds] == ["A", "B", "D", "D"]


def test_cloze_needs_an_answer_for_every_option(tmp_path):
    rows = cloze_rows()
    rows[1]["cloze_C"] = ""
    tsv = write_benchmark_tsv(rows, tmp_path / "toy_mcq.tsv")
    with pytest.raises(DPAInputError, match=r"no cloze answer for option\(s\) \['C'\]") as err:
        evaluate_tsv(None, tsv, tmp_path / "out", generator=ScriptedCloze([""] * 4, ["A"] * 4, ["A"] * 4))
    assert "toy_mcq.tsv" in str(err.value) and "'1'" in str(err.value) and "cloze_C" in str(err.value)


def test_cloze_with_the_real_models(tiny_paths, tiny_llava_dir, tmp_path):
    rows = cloze_rows()
    tsv = write_benchmark_tsv(rows, tmp_path / "toy_mcq.tsv")
    oracle = evaluate_text_oracle(tiny_paths["llm"], tsv, tmp_path / "ceiling", batch_size=3, max_new_tokens=2, device="cpu")
    assert {"toy_mcq/cloze/overall", "meta/toy_mcq/cloze_n_correct"} <= set(oracle)
    mllm = evaluate_tsv(tiny_llava_dir, tsv, tmp_path / "mllm", batch_size=3, max_new_tokens=2, device="cpu")
    assert "toy_mcq/cloze/overall" in mllm
    preds = [json.loads(line) for line in (tmp_path / "mllm/predictions.jsonl").read_text().splitlines()]
    assert all(set(p["cloze_logprobs"]) == set("ABCD") for p in preds)
