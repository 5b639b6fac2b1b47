"""The flat, numeric metric names every evaluator writes to scores.json (DVC reads them as metrics).

Keys are "<benchmark>/<metric>"; see docs/evaluation.md for the full list.
"""

from __future__ import annotations

import math
import re

# Metric names the evaluators write themselves; a category that happens to share one is
# written as "cat_<name>" so it cannot overwrite it.
RESERVED = frozenset({"overall", "n", "n_correct", "n_unparsed", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def metric_part(text: str) -> str:
    """A benchmark or category name as a key part: no '/', no spaces (DVC and MLflow both accept it)."""
    cleaned = _UNSAFE.sub("_", str(text).strip()).strip("_")
    return cleaned or "unnamed"


def category_key(benchmark: str, category: str) -> str:
    part = metric_part(category)
    return f"{metric_part(benchmark)}/{'cat_' + part if part in RESERVED else part}"


def flatten_summary(summary: dict) -> dict[str, float]:
    """A built-in or VLMEvalKit summary (see scoring.summarize) as flat metrics."""
    name = metric_part(summary["benchmark"])
    flat = {f"{name}/overall": float(summary["overall"])}
    for category, acc in summary.get("by_category", {}).items():
        flat[category_key(name, category)] = float(acc)
    for count in ("n", "n_correct", "n_unparsed"):
        if count in summary:
            flat[f"{name}/{count}"] = int(summary[count])
    return flat


def check_flat(metrics: dict) -> dict:
    """Fail loudly rather than hand DVC a non-numeric or non-finite metric."""
    for key, value in metrics.items():
        if "/" not in key or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {key!r}={value!r} is not a finite number under a '<benchmark>/<metric>' key")
    return metrics
