"""One call for the pipeline's evaluate stage: run a list of benchmark specs on one Llava checkpoint
and merge their flat metrics.

out_dir/ (written atomically)
  scores.json      every benchmark's metrics merged, plus meta/evaluate/n_skipped
  report.json      per benchmark: kind, status ("ok" | "skipped"), reason, seconds
A benchmark that cannot run here (data, extra) fails the call, unless its spec says optional: true
(then it is skipped, with the reason in report.json).
  <name>/          that benchmark's own files (scores.json, summary.json, predictions...)

The image benchmarks (builtin_tsv, vlmeval) share one loaded model; the text benchmarks (lmeval)
run afterwards on the LLM, built once in memory after the Llava model is freed.
The same call scores the base models (reference row): pass a Llava directory built from them.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import torch

from ..errors import BenchmarkSkipped, DPAInputError
from ..io import atomic_dir, write_json_atomic
from .benchmark_specs import BenchmarkSpec, parse_specs
from .builtin_scorer import evaluate_text_oracle, evaluate_tsv, has_scene_text
from .flat_metrics import check_flat, meta_key
from .generation import LlavaGenerator, TextChatModel, check_llava_dir
from .lmeval import evaluate_lmeval, load_causal_lm
from .vlmeval_runner import evaluate_vlmeval

log = logging.getLogger(__name__)


class _SharedGenerator:
    """Loads the Llava model on first use, so a run with only text benchmarks never loads it."""

    def __init__(self, model_dir: Path, device: str):
        self.model_dir, self.device, self.generator = model_dir, device, None

    def get(self) -> LlavaGenerator:
        if self.generator is None:
            self.generator = LlavaGenerator(self.model_dir, device=self.device)
        return self.generator

    def release(self) -> None:
        self.generator = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_image_benchmark(spec: BenchmarkSpec, model_dir: Path, out: Path, shared: _SharedGenerator,
                         common: dict) -> dict:
    kwargs = dict(name=spec.name, batch_size=spec.option("batch_size", common["batch_size"]),
                  max_new_tokens=spec.option("max_new_tokens", common["max_new_tokens"]),
                  limit=spec.option("limit", common["limit"]), device=common["device"])
    if spec.kind == "builtin_tsv":
        return evaluate_tsv(model_dir, spec.path, out, generator=shared.get(), **kwargs)
    # VLMEvalKit checks its data before the model is needed: load the model only once it is.
    return evaluate_vlmeval(model_dir, spec.task, out, lmu_data=common["lmu_data"], generator=_Lazy(shared),
                            allow_download=bool(spec.option("allow_download", False)), **kwargs)


class _Lazy:
    """A generator stand-in that loads the shared model at its first call."""

    def __init__(self, shared: _SharedGenerator):
        self.shared = shared

    def generate(self, *args, **kwargs):
        return self.shared.get().generate(*args, **kwargs)

    __call__ = generate


def evaluate_all(
    model_dir: str | os.PathLike,
    benchmarks: list[dict],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: str = "auto",
    limit: int | None = None,
    lmu_data: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> dict:
    """Run every benchmark spec (see benchmark_specs) on `model_dir`; returns the merged flat metrics."""
    specs = parse_specs(benchmarks)
    model_dir = check_llava_dir(model_dir)
    common = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, limit=limit, lmu_data=lmu_data)
    scores: dict = {}
    report: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        shared = _SharedGenerator(model_dir, device)

        def run(spec: BenchmarkSpec, fn) -> None:
            start = time.perf_counter()
            try:
                scores.update(fn())
                entry = {"status": "ok"}
            except BenchmarkSkipped as skip:
                if not spec.option("optional", False):
                    raise DPAInputError(
                        f"benchmark {spec.name!r} cannot run here: {skip.reason}", record=spec.name,
                        fix="make its data (or extra) available, or mark it `optional: true` in evaluate.benchmarks "
                        "to skip it; compare then averages only the benchmarks every arm has.") from skip
                log.warning("%s (optional: skipped)", skip)
                entry = {"status": "skipped", "reason": skip.reason}
            report.append({"name": spec.name, "kind": spec.kind, **entry, "dir": spec.name,
                           "seconds": round(time.perf_counter() - start, 3)})

        for spec in (s for s in specs if s.kind != "lmeval"):
            run(spec, lambda s=spec: _run_image_benchmark(s, model_dir, tmp / s.name, shared, common))
        shared.release()
        text_specs = [s for s in specs if s.kind == "lmeval"]
        if text_specs:
            language_model = load_causal_lm(model_dir, device)
            for spec in text_specs:
                run(spec, lambda s=spec: evaluate_lmeval(
                    model_dir, tmp / s.name, name=s.name, path=s.path, task=s.task,
                    batch_size=s.option("batch_size", batch_size), device=device,
                    limit=s.option("limit", limit), offline=offline, num_fewshot=s.option("num_fewshot"),
                    language_model=language_model,
                    **({"prompt": s.option("prompt")} if s.option("prompt") else {})))
            del language_model
        scores[meta_key("evaluate", "n_skipped")] = sum(r["status"] == "skipped" for r in report)
        write_json_atomic(tmp / "report.json", {"model_dir": str(model_dir.resolve()), "benchmarks": report})
        write_json_atomic(tmp / "scores.json", check_flat(scores))
    return scores


def text_oracle_specs(benchmarks: list[dict]) -> list[BenchmarkSpec]:
    """The built-in TSV benchmarks that carry the scene as text (a scene_text column)."""
    return [s for s in parse_specs(benchmarks)
            if s.kind == "builtin_tsv" and Path(s.path).is_file() and has_scene_text(s.path)]


def evaluate_text_oracles(
    llm_dir: str | os.PathLike,
    benchmarks: list[dict],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: str = "auto",
    limit: int | None = None,
    language_model=None,
    provenance: dict | None = None,
) -> dict | None:
    """The text-oracle ceiling: the LLM alone answers every built-in benchmark that has a scene_text
    column, with the scene given as text. Same layout and keys as evaluate_all (scores.json,
    report.json, <name>/); returns the merged metrics, or None (nothing written) when no benchmark
    has scene text. `language_model`: ask this LM (in memory) with `llm_dir`'s tokenizer instead of
    `llm_dir`'s own weights; `provenance` (e.g. the adapter merged into it) goes into report.json."""
    specs = text_oracle_specs(benchmarks)
    if not specs:
        return None
    model = TextChatModel(llm_dir, device=device, model=language_model)
    scores: dict = {}
    report: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        for spec in specs:
            start = time.perf_counter()
            scores.update(evaluate_text_oracle(
                llm_dir, spec.path, tmp / spec.name, name=spec.name, generator=model,
                batch_size=spec.option("batch_size", batch_size),
                max_new_tokens=spec.option("max_new_tokens", max_new_tokens), limit=spec.option("limit", limit),
                provenance=provenance))
            report.append({"name": spec.name, "kind": "text_oracle", "status": "ok", "dir": spec.name,
                           "seconds": round(time.perf_counter() - start, 3)})
        write_json_atomic(tmp / "report.json", {"llm_dir": str(Path(llm_dir).resolve()), **(provenance or {}),
                                                "benchmarks": report})
        write_json_atomic(tmp / "scores.json", check_flat(scores))
    return scores
