"""A local multiple-choice jsonl (the toy world's text_bench/facts.jsonl) as an lm-eval task.

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
import os
from pathlib import Path

import yaml

from ..errors import DPAInputError
from ..io import write_text_atomic
from .flat_metrics import metric_part

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
