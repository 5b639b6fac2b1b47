"""VLMEvalKit's evaluate() results (a pandas table or a nested dict, per dataset type) as flat metrics.

Values keep VLMEvalKit's units: multiple-choice accuracies are fractions in [0, 1]; some VQA
datasets (OCRBench, DocVQA) report points or percentages.
"""

from __future__ import annotations

import math
import numbers

import pandas as pd

from .flat_metrics import category_key, metric_part


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def _key(name: str, label: str) -> str:
    return f"{name}/overall" if str(label).strip().lower() == "overall" else category_key(name, label)


def _from_table(name: str, table: pd.DataFrame) -> dict[str, float]:
    rows = table.to_dict(orient="records")
    flat = {}
    for row in rows:
        split = row.pop("split", None)
        prefix = name if len(rows) == 1 or split in (None, "none") else f"{name}/{metric_part(split)}"
        for label, value in row.items():
            number = _number(value)
            if number is not None:
                flat[_key(prefix, label)] = number
    return flat


def _from_dict(name: str, result: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for label, value in result.items():
        path = f"{prefix}{metric_part(label)}"
        if isinstance(value, dict):
            flat |= _from_dict(name, value, prefix=f"{path}/")
        elif (number := _number(value)) is not None:
            flat[_key(name, path) if not prefix else f"{name}/{path}"] = number
    return flat


def result_to_metrics(name: str, result) -> dict[str, float]:
    if isinstance(result, pd.DataFrame):
        return _from_table(name, result)
    if isinstance(result, dict):
        return _from_dict(name, result)
    raise TypeError(f"unexpected VLMEvalKit result type {type(result).__name__} for {name}")
