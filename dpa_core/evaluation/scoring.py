"""Score replies against a TSV benchmark: per-item verdicts, per-category and overall accuracy.

Multiple choice is scored up to three ways: generation (the greedy reply, extracted); likelihood
(the letter with the highest log-probability at the answer position, as lm-eval scores multiple
choice), when the model's option-letter log-probabilities are given; and cloze (the option whose
full answer is most likely after the plain question, no letters: OLMES's cloze formulation, which
small models can do long before they can map an answer to its letter), when the benchmark has
cloze answers and their log-probabilities are given."""

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
    # Likelihood scoring (multiple choice, when log-probabilities were computed).
    lik_choice: str | None = None
    lik_correct: bool | None = None
    lik_logprobs: dict[str, float] | None = None
    # Cloze scoring (multiple choice with cloze answers, when their log-probabilities were computed).
    cloze_choice: str | None = None
    cloze_correct: bool | None = None
    cloze_logprobs: dict[str, float] | None = None

    @property
    def unparsed(self) -> bool:
        return self.extracted is None

    def to_record(self) -> dict:
        record = asdict(self) | {"unparsed": self.unparsed}
        return {k: v for k, v in record.items() if not (k.startswith(("lik_", "cloze_")) and v is None)}


def likelihood_choice(logprobs: dict[str, float]) -> str:
    """The option letter with the highest log-probability (ties: the first letter)."""
    return max(sorted(logprobs), key=lambda letter: logprobs[letter])


def score_item(item: BenchmarkItem, prediction: str, logprobs: dict[str, float] | None = None,
               cloze_logprobs: dict[str, float] | None = None) -> ScoredItem:
    if item.options:
        extracted = extract_option(prediction, item.options)
        correct = extracted is not None and extracted == item.answer
    else:
        correct, extracted = match_short_answer(prediction, parse_answer_list(item.answer))
    lik = {}
    if logprobs is not None and item.options:
        choice = likelihood_choice(logprobs)
        lik = {"lik_choice": choice, "lik_correct": choice == item.answer,
               "lik_logprobs": {k: round(v, 6) for k, v in logprobs.items()}}
    if cloze_logprobs is not None and item.options:
        choice = likelihood_choice(cloze_logprobs)
        lik |= {"cloze_choice": choice, "cloze_correct": choice == item.answer,
                "cloze_logprobs": {k: round(v, 6) for k, v in cloze_logprobs.items()}}
    return ScoredItem(item.index, item.category, str(prediction), extracted, item.answer, bool(correct), **lik)


def score_benchmark(bench: TsvBenchmark, predictions: dict[str, str],
                    logprobs: dict[str, dict[str, float]] | None = None,
                    cloze_logprobs: dict[str, dict[str, float]] | None = None) -> list[ScoredItem]:
    """Score every item; `predictions` maps item index -> reply and must cover every item;
    `logprobs` / `cloze_logprobs` (optional) map item index -> {option letter: log-probability}
    of the letter / of the option's cloze answer."""
    missing = [it.index for it in bench.items if it.index not in predictions]
    if missing:
        raise DPAInputError(f"{len(missing)} item(s) have no prediction (first: {missing[0]!r}).",
                            file=bench.path, fix="generate a reply for every row before scoring.")
    return [score_item(it, predictions[it.index], (logprobs or {}).get(it.index), (cloze_logprobs or {}).get(it.index))
            for it in bench.items]


def summarize(name: str, kind: str, scored: list[ScoredItem]) -> dict:
    """{"benchmark", "kind", "overall", "by_category", "n", "n_correct", "n_unparsed"}; accuracies in [0, 1].
    Overall accuracy is over items (not the mean of category accuracies), as VLMEvalKit reports it."""
    n = len(scored)
    overall, by_category, n_correct = _accuracies([(s.category, s.correct) for s in scored])
    summary = {
        "benchmark": name,
        "kind": kind,
        "overall": overall,
        "by_category": by_category,
        "n": n,
        "n_correct": n_correct,
        "n_unparsed": sum(s.unparsed for s in scored),
    }
    for mode, field_name in (("likelihood", "lik_correct"), ("cloze", "cloze_correct")):
        verdicts = [(s.category, getattr(s, field_name)) for s in scored if getattr(s, field_name) is not None]
        if verdicts:
            if len(verdicts) != n:
                raise ValueError(f"{mode} scores for {len(verdicts)} of {n} items")
            overall, by_category, n_correct = _accuracies(verdicts)
            summary[mode] = {"overall": overall, "by_category": by_category, "n_correct": n_correct}
    return summary


def _accuracies(verdicts: list[tuple[str, bool]]) -> tuple[float, dict[str, float], int]:
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for category, correct in verdicts:
        by_cat[category].append(bool(correct))
    n_correct = sum(c for _, c in verdicts)
    return (n_correct / len(verdicts) if verdicts else 0.0,
            {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}, n_correct)
