"""The built-in scorer: a Llava checkpoint answers a VLMEvalKit-format TSV benchmark; replies are
extracted and scored here, without VLMEvalKit.

Multiple choice is scored by generation + extraction ("<name>/overall", "<name>/<category>") and,
when the model gives log-probabilities, by likelihood ("<name>/lik/overall", "<name>/lik/<category>":
the option letter with the highest log-probability at the answer position, one batched forward) and,
for benchmarks with cloze answers (cloze_A.. columns), by cloze ("<name>/cloze/..."): the plain
question without options, each option's full answer scored by its summed log-probability (OLMES's
cloze formulation, which small models can do long before they can map an answer to its letter).
Per-item verdicts give per-category and overall accuracy.

Writes into out_dir (atomically: all files or none):
  scores.json       flat numeric metrics "<name>/overall", "<name>/<category>", "<name>/lik/...",
                    "meta/<name>/n", ...
  summary.json      {"benchmark", "kind", "overall", "by_category", "n", "n_correct", "n_unparsed",
                    "likelihood": {...}, "cloze": {"overall", "by_category", "n_correct"}, ...}
  predictions.jsonl one line per question: index, category, prediction, extracted, answer, correct, unparsed,
                    and for likelihood scoring lik_choice, lik_correct, lik_logprobs (cloze_* alike)

`evaluate_text_oracle` asks a plain LLM the same questions with the scene given as text (the TSV's
scene_text column) instead of the image: the text-oracle ceiling.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from ..errors import DPAInputError
from ..io import atomic_dir, write_json_atomic
from .answer_extraction import extract_option, match_short_answer, parse_answer_list
from .flat_metrics import check_flat, flatten_summary, meta_key
from .generation import GenerationRequest, LlavaGenerator, TextChatModel, cloze_prompt, item_prompt
from .tsv_benchmark import MCQ, BenchmarkItem, TsvBenchmark, load_item_images, read_tsv_benchmark


# ---- Verdicts: one per item, then accuracies ------------------------------------------------------

@dataclass(frozen=True)
class ScoredItem:
    index: str
    category: str
    prediction: str  # the raw reply
    extracted: str | None  # the option letter / normalized reply; None = unparsed
    answer: str
    correct: bool
    # Likelihood scoring (multiple choice, when log-probabilities were computed).
    lik_choice: str | None = None
    lik_correct: bool | None = None
    lik_logprobs: dict[str, float] | None = None
    # Cloze scoring (multiple choice with cloze answers, when their log-probabilities were computed).
    cloze_choice: str | None = None
    cloze_correct: bool | None = None
    cloze_logprobs: dict[str, float] | None = None

    @property
    def unparsed(self) -> bool:
        return self.extracted is None

    def to_record(self) -> dict:
        record = asdict(self) | {"unparsed": self.unparsed}
        return {k: v for k, v in record.items() if not (k.startswith(("lik_", "cloze_")) and v is None)}


def likelihood_choice(logprobs: dict[str, float]) -> str:
    """The option letter with the highest log-probability (ties: the first letter)."""
    return max(sorted(logprobs), key=lambda letter: logprobs[letter])


def score_item(item: BenchmarkItem, prediction: str, logprobs: dict[str, float] | None = None,
               cloze_logprobs: dict[str, float] | None = None) -> ScoredItem:
    if item.options:
        extracted = extract_option(prediction, item.options)
        correct = extracted is not None and extracted == item.answer
    else:
        correct, extracted = match_short_answer(prediction, parse_answer_list(item.answer))
    lik = {}
    if logprobs is not None and item.options:
        choice = likelihood_choice(logprobs)
        lik = {"lik_choice": choice, "lik_correct": choice == item.answer,
               "lik_logprobs": {k: round(v, 6) for k, v in logprobs.items()}}
    if cloze_logprobs is not None and item.options:
        choice = likelihood_choice(cloze_logprobs)
        lik |= {"cloze_choice": choice, "cloze_correct": choice == item.answer,
                "cloze_logprobs": {k: round(v, 6) for k, v in cloze_logprobs.items()}}
    return ScoredItem(item.index, item.category, str(prediction), extracted, item.answer, bool(correct), **lik)


def score_benchmark(bench: TsvBenchmark, predictions: dict[str, str],
                    logprobs: dict[str, dict[str, float]] | None = None,
                    cloze_logprobs: dict[str, dict[str, float]] | None = None) -> list[ScoredItem]:
    """Score every item; `predictions` maps item index -> reply and must cover every item;
    `logprobs` / `cloze_logprobs` (optional) map item index -> {option letter: log-probability}
    of the letter / of the option's cloze answer."""
    missing = [it.index for it in bench.items if it.index not in predictions]
    if missing:
        raise DPAInputError(f"{len(missing)} item(s) have no prediction (first: {missing[0]!r}).",
                            file=bench.path, fix="generate a reply for every row before scoring.")
    return [score_item(it, predictions[it.index], (logprobs or {}).get(it.index), (cloze_logprobs or {}).get(it.index))
            for it in bench.items]


def summarize(name: str, kind: str, scored: list[ScoredItem]) -> dict:
    """{"benchmark", "kind", "overall", "by_category", "n", "n_correct", "n_unparsed"}; accuracies in [0, 1].
    Overall accuracy is over items (not the mean of category accuracies), as VLMEvalKit reports it."""
    n = len(scored)
    overall, by_category, n_correct = _accuracies([(s.category, s.correct) for s in scored])
    summary = {
        "benchmark": name,
        "kind": kind,
        "overall": overall,
        "by_category": by_category,
        "n": n,
        "n_correct": n_correct,
        "n_unparsed": sum(s.unparsed for s in scored),
    }
    for mode, field_name in (("likelihood", "lik_correct"), ("cloze", "cloze_correct")):
        verdicts = [(s.category, getattr(s, field_name)) for s in scored if getattr(s, field_name) is not None]
        if verdicts:
            if len(verdicts) != n:
                raise ValueError(f"{mode} scores for {len(verdicts)} of {n} items")
            overall, by_category, n_correct = _accuracies(verdicts)
            summary[mode] = {"overall": overall, "by_category": by_category, "n_correct": n_correct}
    return summary


def _accuracies(verdicts: list[tuple[str, bool]]) -> tuple[float, dict[str, float], int]:
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for category, correct in verdicts:
        by_cat[category].append(bool(correct))
    n_correct = sum(c for _, c in verdicts)
    return (n_correct / len(verdicts) if verdicts else 0.0,
            {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}, n_correct)


# ---- Answering a benchmark and writing its files -------------------------------------------------

# Answers a list of requests: LlavaGenerator, or any callable with the same signature (tests pass a fake).
GenerateFn = Callable[..., list[str]]


def benchmark_requests(bench: TsvBenchmark, prompt=item_prompt) -> list[GenerationRequest]:
    return [GenerationRequest(prompt(it), load_images=partial(load_item_images, it, bench.path))
            for it in bench.items]


def text_oracle_requests(bench: TsvBenchmark, prompt=item_prompt) -> list[GenerationRequest]:
    """The MLLM's prompt with the scene as text before it, and no image."""
    missing = [it.index for it in bench.items if not it.scene_text]
    if missing:
        raise DPAInputError(f"{len(missing)} row(s) have no scene_text (first: {missing[0]!r}).", file=bench.path,
                            record=missing[0], fix="fill the scene_text column for every row (the toy world "
                            "writes it), or leave the column out to skip the text-oracle ceiling.")
    return [GenerationRequest(f"{it.scene_text}\n{prompt(it)}") for it in bench.items]


def has_scene_text(tsv_path: str | os.PathLike) -> bool:
    """Whether a benchmark TSV carries the scene as text (the header has a scene_text column)."""
    with open(tsv_path, encoding="utf-8") as f:
        return "scene_text" in f.readline().rstrip("\n").split("\t")


def write_scored_outputs(out_dir: str | os.PathLike, summary: dict, scored: list[ScoredItem]) -> dict:
    metrics = flatten_summary(summary)
    if "generation" in summary:
        metrics[meta_key(summary["benchmark"], "seconds")] = summary["generation"]["seconds"]
    for mode, key in (("likelihood", "lik_seconds"), ("cloze", "cloze_seconds")):
        if mode in summary and "seconds" in summary[mode]:
            metrics[meta_key(summary["benchmark"], key)] = summary[mode]["seconds"]
    metrics = check_flat(metrics)
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for s in scored:
                f.write(json.dumps(s.to_record(), ensure_ascii=False) + "\n")
        write_json_atomic(tmp / "summary.json", summary)
        write_json_atomic(tmp / "scores.json", metrics)
    return metrics


def _answer_and_score(bench: TsvBenchmark, requests: list[GenerationRequest], generate, out_dir, *,
                      batch_size: int, max_new_tokens: int, likelihood: bool | None, extra: dict,
                      cloze_requests: list[GenerationRequest] | None = None) -> dict:
    start = time.perf_counter()
    replies = generate(requests, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=bench.name)
    seconds = time.perf_counter() - start
    # Likelihood needs the model's log-probabilities: real models give them, a scripted stand-in may not.
    if likelihood is None:
        likelihood = hasattr(generate, "option_logprobs")
    logprobs, lik_seconds = None, None
    if likelihood and bench.kind == MCQ:
        start = time.perf_counter()
        letters = [list(it.options) for it in bench.items]
        found = generate.option_logprobs(requests, letters, batch_size=batch_size, desc=f"{bench.name} (likelihood)")
        logprobs = {it.index: lp for it, lp in zip(bench.items, found, strict=True)}
        lik_seconds = time.perf_counter() - start
    cloze, cloze_seconds = None, None
    if (likelihood and bench.kind == MCQ and hasattr(generate, "reply_logprobs") and cloze_requests is not None
            and all(it.cloze for it in bench.items)):
        start = time.perf_counter()
        found = generate.reply_logprobs(cloze_requests, [it.cloze for it in bench.items], batch_size=batch_size,
                                        desc=f"{bench.name} (cloze)")
        cloze = {it.index: lp for it, lp in zip(bench.items, found, strict=True)}
        cloze_seconds = time.perf_counter() - start
    scored = score_benchmark(bench, {it.index: r for it, r in zip(bench.items, replies, strict=True)}, logprobs, cloze)
    summary = summarize(bench.name, bench.kind, scored) | extra | {
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "greedy": True,
                       "seconds": round(seconds, 3)},
    }
    if "likelihood" in summary:
        summary["likelihood"] |= {"batch_size": batch_size, "seconds": round(lik_seconds, 3)}
    if "cloze" in summary:
        summary["cloze"] |= {"batch_size": batch_size, "seconds": round(cloze_seconds, 3)}
    return write_scored_outputs(out_dir, summary, scored)


def evaluate_tsv(
    model_dir: str | os.PathLike | None,
    tsv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: str = "auto",
    limit: int | None = None,
    generator: GenerateFn | None = None,
    likelihood: bool | None = None,
) -> dict:
    """Answer and score one TSV benchmark; returns the flat metrics also written to out_dir/scores.json.

    `generator` reuses an already loaded model (evaluate_all passes one LlavaGenerator to every
    built-in benchmark); without it the model is loaded from `model_dir`. `likelihood`: also score
    multiple choice by the option letters' log-probabilities (None: whenever the generator can).
    """
    bench = read_tsv_benchmark(tsv_path, name=name, limit=limit)
    generate = generator if generator is not None else LlavaGenerator(model_dir, device=device)
    extra = {"tsv": str(Path(tsv_path).resolve()),
             "model_dir": str(Path(model_dir).resolve()) if model_dir is not None else None}
    return _answer_and_score(bench, benchmark_requests(bench), generate, out_dir, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, likelihood=likelihood, extra=extra,
                             cloze_requests=benchmark_requests(bench, cloze_prompt))


def evaluate_text_oracle(
    llm_dir: str | os.PathLike | None,
    tsv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: str = "auto",
    limit: int | None = None,
    generator: GenerateFn | None = None,
    provenance: dict | None = None,
) -> dict:
    """The text-oracle ceiling: the LLM alone (no image) answers each question with the row's scene_text
    before the same prompt the MLLM gets, scored in both modes; same files and keys as evaluate_tsv.
    `provenance` (e.g. an adapter merged into the generator's LM) is recorded in summary.json."""
    bench = read_tsv_benchmark(tsv_path, name=name, limit=limit)
    requests = text_oracle_requests(bench)
    generate = generator if generator is not None else TextChatModel(llm_dir, device=device)
    extra = {"tsv": str(Path(tsv_path).resolve()), "llm_dir": str(Path(llm_dir).resolve()) if llm_dir else None,
             "text_oracle": True, **(provenance or {})}
    return _answer_and_score(bench, requests, generate, out_dir, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, likelihood=None, extra=extra,
                             cloze_requests=text_oracle_requests(bench, cloze_prompt))
