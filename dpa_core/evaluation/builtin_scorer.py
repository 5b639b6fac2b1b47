"""The built-in scorer: a Llava checkpoint answers a VLMEvalKit-format TSV benchmark; replies are
extracted and scored here, without VLMEvalKit.

Writes into out_dir (atomically: all files or none):
  scores.json       flat numeric metrics "<name>/overall", "<name>/<category>", "meta/<name>/n", ...
  summary.json      {"benchmark", "kind", "overall", "by_category", "n", "n_correct", "n_unparsed", ...}
  predictions.jsonl one line per question: index, category, prediction, extracted, answer, correct, unparsed
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable

from ..io import atomic_dir, write_json_atomic
from .flat_metrics import check_flat, flatten_summary, meta_key
from .llava_generation import GenerationRequest, LlavaGenerator
from .prompts import item_prompt
from .scoring import ScoredItem, score_benchmark, summarize
from .tsv_benchmark import TsvBenchmark, load_item_images, read_tsv_benchmark

# Answers a list of requests: LlavaGenerator, or any callable with the same signature (tests pass a fake).
GenerateFn = Callable[..., list[str]]


def benchmark_requests(bench: TsvBenchmark) -> list[GenerationRequest]:
    return [GenerationRequest(item_prompt(it), load_images=partial(load_item_images, it, bench.path))
            for it in bench.items]


def write_scored_outputs(out_dir: str | os.PathLike, summary: dict, scored: list[ScoredItem]) -> dict:
    metrics = flatten_summary(summary)
    if "generation" in summary:
        metrics[meta_key(summary["benchmark"], "seconds")] = summary["generation"]["seconds"]
    metrics = check_flat(metrics)
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for s in scored:
                f.write(json.dumps(s.to_record(), ensure_ascii=False) + "\n")
        write_json_atomic(tmp / "summary.json", summary)
        write_json_atomic(tmp / "scores.json", metrics)
    return metrics


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
) -> dict:
    """Answer and score one TSV benchmark; returns the flat metrics also written to out_dir/scores.json.

    `generator` reuses an already loaded model (evaluate_all passes one LlavaGenerator to every
    built-in benchmark); without it the model is loaded from `model_dir`.
    """
    bench = read_tsv_benchmark(tsv_path, name=name, limit=limit)
    generate = generator if generator is not None else LlavaGenerator(model_dir, device=device)
    start = time.perf_counter()
    replies = generate(benchmark_requests(bench), batch_size=batch_size, max_new_tokens=max_new_tokens,
                       desc=bench.name)
    seconds = time.perf_counter() - start
    scored = score_benchmark(bench, {it.index: r for it, r in zip(bench.items, replies, strict=True)})
    summary = summarize(bench.name, bench.kind, scored) | {
        "tsv": str(Path(tsv_path).resolve()),
        "model_dir": str(Path(model_dir).resolve()) if model_dir is not None else None,
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "greedy": True,
                       "seconds": round(seconds, 3)},
    }
    return write_scored_outputs(out_dir, summary, scored)
