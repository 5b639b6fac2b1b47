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

import typing
from dataclasses import dataclass, fields

from ..errors import DPAInputError, SettingError
from ..settings import BenchmarkKind, BenchmarkSettings
from .flat_metrics import META, metric_part

# The keys, kinds and per-kind rules of a spec are dpa_core.settings.BenchmarkSettings (params.yaml's
# evaluate.benchmarks is a list of them); name, kind, path and task are fields here, the rest options.
KINDS = typing.get_args(BenchmarkKind)
_OPTIONAL = {f.name for f in fields(BenchmarkSettings)} - {"name", "kind", "path", "task"}


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
    try:
        BenchmarkSettings(**raw)  # the per-kind rules (path, task)
    except SettingError as e:
        raise DPAInputError(e.problem, record=name, fix=e.fix) from None
    path, task = raw.get("path"), raw.get("task")
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
