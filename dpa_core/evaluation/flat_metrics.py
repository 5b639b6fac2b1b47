"""The flat, numeric metric names every evaluator writes to scores.json (DVC reads them as metrics).

Keys are "<benchmark>/<metric>" for scores (accuracies in [0, 1]) and "meta/<benchmark>/<what>" for
counts and timings, which the comparison leaves out of its score columns. See docs/evaluation.md.
"""

from __future__ import annotations

import math
import re

# Metric names the evaluators write themselves; a category that happens to share one is
# written as "cat_<name>" so it cannot overwrite it.
RESERVED = frozenset({"overall", "acc", "acc_norm", "lik", "cloze"})
META = "meta"
# Likelihood-scored multiple choice: "<benchmark>/lik/overall", "<benchmark>/lik/<category>".
LIKELIHOOD = "lik"
# Cloze-scored multiple choice (each option's full answer by likelihood, no letters):
# "<benchmark>/cloze/overall", "<benchmark>/cloze/<category>".
CLOZE = "cloze"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def metric_part(text: str) -> str:
    """A benchmark or category name as a key part: no '/', no spaces (DVC and MLflow both accept it)."""
    cleaned = _UNSAFE.sub("_", str(text).strip()).strip("_")
    return cleaned if cleaned and cleaned != META else f"{cleaned or 'unnamed'}_"


def category_key(benchmark: str, category: str) -> str:
    part = metric_part(category)
    return f"{metric_part(benchmark)}/{'cat_' + part if part in RESERVED else part}"


def flatten_summary(summary: dict) -> dict[str, float]:
    """A built-in or VLMEvalKit summary (see builtin_scorer.summarize) as flat metrics."""
    name = metric_part(summary["benchmark"])
    flat = {f"{name}/overall": float(summary["overall"])}
    for category, acc in summary.get("by_category", {}).items():
        flat[category_key(name, category)] = float(acc)
    for count in ("n", "n_correct", "n_unparsed"):
        if count in summary:
            flat[meta_key(name, count)] = int(summary[count])
    lik = summary.get("likelihood")
    if lik:
        flat[likelihood_key(name, None)] = float(lik["overall"])
        for category, acc in lik["by_category"].items():
            flat[likelihood_key(name, category)] = float(acc)
        flat[meta_key(name, "lik_n_correct")] = int(lik["n_correct"])
    cloze = summary.get("cloze")
    if cloze:
        flat[likelihood_key(name, None, CLOZE)] = float(cloze["overall"])
        for category, acc in cloze["by_category"].items():
            flat[likelihood_key(name, category, CLOZE)] = float(acc)
        flat[meta_key(name, "cloze_n_correct")] = int(cloze["n_correct"])
    return flat


def likelihood_key(benchmark: str, category: str | None, mode: str = LIKELIHOOD) -> str:
    """ "<benchmark>/lik/overall" (category None) or "<benchmark>/lik/<category>" (key-safe as above);
    mode CLOZE gives the same keys under "cloze"."""
    part = "overall" if category is None else category_key(benchmark, category).split("/", 1)[1]
    return f"{metric_part(benchmark)}/{mode}/{part}"


def scoring_mode(key: str) -> str | None:
    """LIKELIHOOD or CLOZE for a key of a second scoring of the same benchmark, None otherwise."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] != META and parts[1] in (LIKELIHOOD, CLOZE) else None


def is_likelihood_key(key: str) -> bool:
    """A key of a likelihood-based second scoring (letters or cloze), not a benchmark's own score."""
    return scoring_mode(key) is not None


def meta_key(benchmark: str, what: str) -> str:
    return f"{META}/{metric_part(benchmark)}/{what}"


def check_flat(metrics: dict) -> dict:
    """Fail loudly rather than hand DVC a non-numeric or non-finite metric."""
    # Keys are "<benchmark>/<metric>" or "meta/<benchmark>/<what>": both contain a "/".
    for key, value in metrics.items():
        if "/" not in key or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {key!r}={value!r} is not a finite number under a '<benchmark>/<metric>' key")
    return metrics
