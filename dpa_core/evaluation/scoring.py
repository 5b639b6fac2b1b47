"""Score replies against a TSV benchmark: per-item verdicts, per-category and overall accuracy."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

from ..errors import DPAInputError
from .answer_extraction import extract_option, match_short_answer, parse_answer_list
from .tsv_benchmark import BenchmarkItem, TsvBenchmark


@dataclass(frozen=True)
class ScoredItem:
    index: str
    category: str
    prediction: str  # the raw reply
    extracted: str | None  # the option letter / normalized reply; None = unparsed
    answer: str
    correct: bool

    @property
    def unparsed(self) -> bool:
        return self.extracted is None

    def to_record(self) -> dict:
        return asdict(self) | {"unparsed": self.unparsed}


def score_item(item: BenchmarkItem, prediction: str) -> ScoredItem:
    if item.options:
        extracted = extract_option(prediction, item.options)
        correct = extracted is not None and extracted == item.answer
    else:
        correct, extracted = match_short_answer(prediction, parse_answer_list(item.answer))
    return ScoredItem(item.index, item.category, str(prediction), extracted, item.answer, bool(correct))


def score_benchmark(bench: TsvBenchmark, predictions: dict[str, str]) -> list[ScoredItem]:
    """Score every item; `predictions` maps item index -> reply and must cover every item."""
    missing = [it.index for it in bench.items if it.index not in predictions]
    if missing:
        raise DPAInputError(f"{len(missing)} item(s) have no prediction (first: {missing[0]!r}).",
                            file=bench.path, fix="generate a reply for every row before scoring.")
    return [score_item(it, predictions[it.index]) for it in bench.items]


def summarize(name: str, kind: str, scored: list[ScoredItem]) -> dict:
    """{"benchmark", "kind", "overall", "by_category", "n", "n_correct", "n_unparsed"}; accuracies in [0, 1].
    Overall accuracy is over items (not the mean of category accuracies), as VLMEvalKit reports it."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for s in scored:
        by_cat[s.category].append(s.correct)
    n = len(scored)
    n_correct = sum(s.correct for s in scored)
    return {
        "benchmark": name,
        "kind": kind,
        "overall": n_correct / n if n else 0.0,
        "by_category": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
        "n": n,
        "n_correct": n_correct,
        "n_unparsed": sum(s.unparsed for s in scored),
    }
