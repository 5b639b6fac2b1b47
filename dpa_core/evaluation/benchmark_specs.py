"""Benchmark specs, as the pipeline's params.yaml lists them, checked before anything runs.

  {name: toy_mcq,    kind: builtin_tsv, path: data/.../toy_mcq.tsv}
  {name: mmbench,    kind: vlmeval,     task: MMBench_DEV_EN}          # data from LMUData
  {name: text_facts, kind: lmeval,      path: data/.../facts.jsonl}    # local multiple-choice jsonl
  {name: mmlu,       kind: lmeval,      task: mmlu}                    # lm-eval task by name
Optional per spec: limit, batch_size, max_new_tokens (generation kinds), prompt and num_fewshot
(lmeval), allow_download (vlmeval), optional (true: a benchmark that cannot run here is skipped and
recorded; by default it fails the evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DPAInputError
from .flat_metrics import META, metric_part

KINDS = ("builtin_tsv", "vlmeval", "lmeval")
_OPTIONAL = {"limit", "batch_size", "max_new_tokens", "prompt", "num_fewshot", "allow_download", "optional"}


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: str
    path: str | None = None
    task: str | None = None
    options: dict | None = None

    def option(self, key: str, default=None):
        value = (self.options or {}).get(key)
        return default if value is None else value


def parse_spec(raw: dict, position: int) -> BenchmarkSpec:
    where = f"benchmark #{position + 1}"
    if not isinstance(raw, dict):
        raise DPAInputError(f"{where} is {raw!r}, not a mapping.", record=where,
                            fix="write each benchmark as {name: ..., kind: ..., path/task: ...}.")
    unknown = set(raw) - {"name", "kind", "path", "task"} - _OPTIONAL
    if unknown:
        raise DPAInputError(f"unknown key(s) {sorted(unknown)}.", record=raw.get("name", where),
                            fix=f"use name, kind, path, task and optionally {sorted(_OPTIONAL)}.")
    name, kind = raw.get("name"), raw.get("kind")
    if not name or metric_part(name) != name or name == META:
        raise DPAInputError(f"benchmark name {name!r} is empty or has characters other than letters, digits, "
                            "'_', '.', '-'.", record=where, fix="name it like toy_mcq (it becomes the metric prefix).")
    if kind not in KINDS:
        raise DPAInputError(f"unknown kind {kind!r}.", record=name, fix=f"use one of {', '.join(KINDS)}.")
    path, task = raw.get("path"), raw.get("task")
    if kind == "builtin_tsv" and not path:
        raise DPAInputError("a builtin_tsv benchmark needs 'path' (the TSV).", record=name, fix="add path: <file>.tsv.")
    if kind == "vlmeval" and not task:
        raise DPAInputError("a vlmeval benchmark needs 'task' (VLMEvalKit's dataset name, e.g. MMBench_DEV_EN).",
                            record=name, fix="add task: <dataset name>; its TSV must be in LMUData.")
    if kind == "lmeval" and bool(path) == bool(task):
        raise DPAInputError("an lmeval benchmark needs exactly one of 'path' (local jsonl) and 'task' (lm-eval name).",
                            record=name, fix="set path: <facts.jsonl> or task: <lm-eval task>.")
    options = {k: raw[k] for k in _OPTIONAL if k in raw}
    return BenchmarkSpec(name=name, kind=kind, path=path, task=task, options=options)


def parse_specs(benchmarks: list[dict]) -> list[BenchmarkSpec]:
    specs = [parse_spec(raw, i) for i, raw in enumerate(benchmarks)]
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise DPAInputError(f"benchmark name {spec.name!r} is used twice.", record=spec.name,
                                fix="give every benchmark its own name (it prefixes its metrics).")
        seen.add(spec.name)
    return specs
