"""The question prompts, worded as LLaVA's evaluation (and VLMEvalKit's LLaVA adapter) words them,
so that scores are comparable with published LLaVA-style numbers."""

from __future__ import annotations

from .tsv_benchmark import BenchmarkItem

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return f"{text}\n{MCQ_INSTRUCTION}"


def short_answer_prompt(question: str, hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    return f"{text}\n{SHORT_ANSWER_INSTRUCTION}"


def cloze_prompt(item: BenchmarkItem) -> str:
    """The cloze formulation: the plain question, no options and no instruction; each option is
    then scored as the answer it would make (BenchmarkItem.cloze)."""
    return f"{item.hint}\n{item.question}" if item.hint else item.question


def item_prompt(item: BenchmarkItem) -> str:
    if item.options:
        return mcq_prompt(item.question, item.options, item.hint)
    return short_answer_prompt(item.question, item.hint)
