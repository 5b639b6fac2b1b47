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

A local multiple-choice jsonl (the toy world's text_bench/facts.jsonl) becomes an lm-eval task.
Each line: {"id": ..., "question": str, "choices": [str, ...], "answer": int (index of the right choice)},
optionally "choice_prefix" / "choice_suffix": text scored around every choice, so that a choice can be
scored as the full answer sentence the model would say ("pomem lives in " + "marn" + ".").
lm-eval scores it by log-likelihood: the choice with the highest log-probability after the prompt is
the model's answer (acc), or the highest per-character log-probability (acc_norm).

Prompt: a Jinja template over the record (default: the bare question, each choice its continuation
after a space), or "chat": the question as the user turn of the LLM's own chat template, the
choice scored as the start of the assistant's reply.

The YAML and a normalised copy of the data (full continuations) are written at run time into an
include directory, with absolute paths: lm-eval resolves `data_files` from where it runs.
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
import yaml

from ..errors import BenchmarkSkipped, DPAInputError
from ..io import atomic_dir, write_json_atomic, write_text_atomic
from .flat_metrics import check_flat, meta_key, metric_part
from .generation import resolve_device
from .lm_extraction import is_llava_dir, load_language_model


# ---- A local jsonl as an lm-eval task -----------------------------------------------------------

# The bare question, the choice scored as its continuation (" marn"). The toy world's LLM learnt its
# facts as plain sentences and chats, never in a "Question: ... Answer:" frame (on one smoke world's
# base LLM: bare question 0.39, "Question:/Answer:" 0.17, chance 0.25). Best for it: prompt "chat"
# with choice_prefix/suffix in the records (full answer sentences), which reproduces its own check.
DEFAULT_PROMPT = "{{question}}"
TASK_PREFIX = "dpa_"  # keeps our task names apart from lm-eval's own registry


def check_mcq_jsonl(path: str | os.PathLike) -> int:
    """Validate every line; returns the number of questions."""
    path = Path(path)
    if not path.is_file():
        raise DPAInputError("text benchmark file not found.", file=path, fix="check the benchmark's path.")
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DPAInputError(f"not JSON: {err}", file=path, record=f"line {lineno}",
                                    fix="write one JSON object per line.") from err
            choices, answer = rec.get("choices"), rec.get("answer")
            if not isinstance(rec.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
                raise DPAInputError("needs a 'question' string and a 'choices' list of 2 or more strings.",
                                    file=path, record=rec.get("id", f"line {lineno}"),
                                    fix='write {"id", "question", "choices": [...], "answer": <index>}.')
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise DPAInputError(f"'answer' must be the index (0..{len(choices) - 1}) of the right choice, "
                                    f"got {answer!r}.", file=path, record=rec.get("id", f"line {lineno}"),
                                    fix="store the position of the right choice in 'choices' as an integer.")
            n += 1
    if n == 0:
        raise DPAInputError("the text benchmark has no questions.", file=path, fix="add questions, or drop it.")
    return n


def task_name(name: str) -> str:
    return TASK_PREFIX + metric_part(name).lower().replace("-", "_").replace(".", "_")


def chat_prompt_template(tokenizer_dir: str | os.PathLike) -> str:
    """The LLM's chat template around one user turn, as a Jinja template over the record."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tokenizer.chat_template:
        raise DPAInputError("prompt 'chat' needs a chat template, and this tokenizer has none.",
                            file=Path(tokenizer_dir) / "tokenizer_config.json",
                            fix="use a chat/Instruct LLM, or give the benchmark a Jinja prompt instead.")
    marker = "\x00QUESTION\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
    before, after = rendered.split(marker)
    raw = lambda text: "{% raw %}" + text + "{% endraw %}" if text else ""  # noqa: E731 - template text stays literal
    return raw(before) + "{{question}}" + raw(after)


def _normalised_records(jsonl_path: Path) -> list[dict]:
    records = []
    for line in jsonl_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            prefix, suffix = str(rec.get("choice_prefix", "")), str(rec.get("choice_suffix", ""))
            records.append({"id": rec.get("id"), "question": rec["question"], "answer": rec["answer"],
                            "choices": [f"{prefix}{c}{suffix}" for c in rec["choices"]]})
    return records


def write_mcq_task(name: str, jsonl_path: str | os.PathLike, include_dir: str | os.PathLike,
                   prompt: str = DEFAULT_PROMPT, tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Write `<include_dir>/<task>.yaml` (+ its data) for the jsonl; returns the lm-eval task name.
    prompt "chat" renders the chat template of the tokenizer in `tokenizer_dir`."""
    check_mcq_jsonl(jsonl_path)
    task = task_name(name)
    chat = prompt == "chat"
    if chat and tokenizer_dir is None:
        raise DPAInputError("prompt 'chat' needs the model's tokenizer.", record=name, fix="pass tokenizer_dir.")
    data = Path(include_dir).resolve() / f"{task}.jsonl"
    records = _normalised_records(Path(jsonl_path))
    write_text_atomic(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    config = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": chat_prompt_template(tokenizer_dir) if chat else prompt,
        # After a chat header the reply starts at once; after a bare question, after a space.
        "target_delimiter": "" if chat else " ",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    write_text_atomic(Path(include_dir) / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))
    return task


# ---- Running lm-eval ------------------------------------------------------------------------------

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
