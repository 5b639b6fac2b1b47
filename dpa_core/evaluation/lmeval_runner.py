"""Text abilities with lm-eval's HF backend: the LLM inside a Llava checkpoint (built in memory from
the checkpoint's LLM tensors and handed to lm-eval as a model instance, `HFLM(pretrained=model)`:
no copy is written), or a plain causal-LM directory (the base LLM, as a reference row).

A benchmark is either a local multiple-choice jsonl (`path`, e.g. the toy world's facts.jsonl, turned
into an lm-eval task at run time) or an lm-eval task/group by name (`task`: mmlu, arc_easy, ...).
Named tasks fetch their data from the Hugging Face hub: where it is neither cached nor reachable
the benchmark raises BenchmarkSkipped (no score is written).

Writes into out_dir (atomically): scores.json ("<name>/acc", "<name>/acc_norm", meta/...),
summary.json, results.json (lm-eval's own results) and samples.jsonl (per question: choice
log-likelihoods and verdicts).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BenchmarkSkipped, DPAInputError
from ..io import atomic_dir, write_json_atomic
from .flat_metrics import check_flat, meta_key, metric_part
from .generation import resolve_device
from .lm_extraction import is_llava_dir, load_language_model
from .lmeval_tasks import DEFAULT_PROMPT, write_mcq_task

_REPORTED = ("acc", "acc_norm")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextmanager
def hub_offline(offline: bool | None) -> Iterator[None]:
    """offline=True: no hub requests (a missing dataset fails at once instead of after ~30 s of
    retries); None: leave everything as it is. huggingface_hub and datasets read their offline
    switches from the environment only at import, so their module constants are set as well."""
    if offline is None:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {v: os.environ.get(v) for v in _OFFLINE_VARS}
    saved_consts = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                    (datasets.config, "HF_DATASETS_OFFLINE")]
    saved_values = [getattr(m, a) for m, a in saved_consts]
    for v in _OFFLINE_VARS:
        os.environ[v] = "1" if offline else "0"
    for module, attr in saved_consts:
        setattr(module, attr, bool(offline))
    try:
        yield
    finally:
        for v, value in saved_env.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value
        for (module, attr), value in zip(saved_consts, saved_values):
            setattr(module, attr, value)


def load_causal_lm(model_dir: str | os.PathLike, device: str = "auto"):
    """(model, tokenizer) for lm-eval: a Llava checkpoint's LLM built in memory (its tensors only),
    or a causal-LM directory as it is; fp32 on CPU, bf16 on a GPU, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DPAInputError("no config.json: not a saved model directory.", file=model_dir,
                            fix="pass a Llava checkpoint or a causal-LM directory written by save_pretrained.")
    resolved = resolve_device(device)
    dtype = torch.float32 if resolved.type == "cpu" else torch.bfloat16
    if is_llava_dir(model_dir):
        model = load_language_model(model_dir, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False)
    return model.to(resolved).eval(), AutoTokenizer.from_pretrained(model_dir)


def _load_or_skip(task_manager, task: str, name: str, local: bool):
    try:
        task_manager.load([task])
    except Exception as err:  # noqa: BLE001 - lm-eval/datasets raise many types for "data not available"
        if local:
            raise
        raise BenchmarkSkipped(name, f"lm-eval task {task!r} is not available here ({type(err).__name__}: "
                               f"{str(err)[:300]}). Its dataset comes from the Hugging Face hub: run where the hub is "
                               "reachable, or pre-fill the HF datasets cache.") from err


def _metrics(name: str, task: str, results: dict, seconds: float) -> dict:
    row = results["results"].get(task, {})
    flat = {}
    for metric in _REPORTED:
        if (value := row.get(f"{metric},none")) is not None:
            flat[f"{name}/{metric}"] = float(value)
        stderr = row.get(f"{metric}_stderr,none")
        if isinstance(stderr, (int, float)):
            flat[meta_key(name, f"{metric}_stderr")] = float(stderr)
    if not any(k.startswith(f"{name}/") for k in flat):
        raise RuntimeError(f"lm-eval reported no acc for {task!r}: {sorted(row)}")
    n = results.get("n-samples", {}).get(task, {}).get("effective")
    if isinstance(n, int):
        flat[meta_key(name, "n")] = n
    flat[meta_key(name, "seconds")] = round(seconds, 3)
    return check_flat(flat)


def evaluate_lmeval(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    path: str | os.PathLike | None = None,
    task: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    limit: int | None = None,
    offline: bool | None = None,
    language_model: tuple | None = None,
) -> dict:
    """Score a Llava checkpoint's LLM (or a causal LM) on one text benchmark; returns flat metrics.

    `language_model`: (model, tokenizer) from `load_causal_lm(model_dir)`, to share one loaded model
    between several benchmarks; loaded here when not given."""
    if (path is None) == (task is None):
        raise DPAInputError(f"text benchmark {name!r} needs exactly one of 'path' (local jsonl) or 'task' "
                            "(lm-eval name).", record=name, fix="set path: <facts.jsonl> or task: <lm-eval task name>.")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = metric_part(name)
    with hub_offline(offline), tempfile.TemporaryDirectory(prefix="dpa-lmeval-tasks-") as include_dir:
        local = path is not None
        task_id = write_mcq_task(name, path, include_dir, prompt, tokenizer_dir=model_dir) if local else str(task)
        manager = TaskManager(include_path=include_dir, include_defaults=not local)
        _load_or_skip(manager, task_id, name, local)
        model, tokenizer = language_model or load_causal_lm(model_dir, device)
        # HFLM warns that device/dtype arguments are ignored for a model instance: placing the
        # model is done above, on purpose, so that one warning is dropped (errors still show).
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        finally:
            hf_log.setLevel(level)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[task_id], task_manager=manager, num_fewshot=num_fewshot, batch_size=batch_size,
            limit=limit, log_samples=True, bootstrap_iters=1000,
        )
        seconds = time.perf_counter() - start
    metrics = _metrics(name, task_id, results, seconds)
    samples = results.pop("samples", {})
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for sample in samples.get(task_id, []):
                f.write(json.dumps(sample, ensure_ascii=False, default=str) + "\n")
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        write_json_atomic(tmp / "summary.json", {
            "benchmark": name, "kind": "lmeval", "task": task_id,
            "source": str(Path(path).resolve()) if local else task,
            "model_dir": str(Path(model_dir).resolve()), "prompt": prompt if local else None,
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("meta/")},
        })
        write_json_atomic(tmp / "scores.json", metrics)
    return metrics
