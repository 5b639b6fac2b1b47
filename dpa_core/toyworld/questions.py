"""Questions about a Scene, in the five vision-centric categories of the benchmark. Each question
has an open answer (an own-style sentence, for chat data) and four options (for multiple choice)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scenes import ALL_POSITIONS, COLORS, NUMBER_WORDS, RELATIONS, SHAPES, Scene, aligned_pairs, relation

CATEGORIES = ("color", "shape", "position", "count", "relation")
LETTERS = "ABCD"
# LLaVA-1.5's multiple-choice suffix; instruction data uses it so the model learns to answer
# with a letter, the way VLMEvalKit-style evaluators ask.
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Question:
    category: str
    question: str
    answer: str  # open answer, a sentence in the own style
    options: tuple[str, str, str, str]
    correct: int  # index into options
    # The open answer each option would give, in the same order: the cloze formulation of the
    # question scores these sentences by likelihood (no letters; docs/evaluation.md).
    option_answers: tuple[str, str, str, str]

    @property
    def letter(self) -> str:
        return LETTERS[self.correct]


def format_mcq(question: str, options: tuple[str, ...] | list[str]) -> str:
    """The prompt text of a multiple-choice question, as used in the instruction data."""
    lines = [question] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)] + [MCQ_SUFFIX]
    return "\n".join(lines)


def _options(rng: random.Random, right: str, pool: tuple[str, ...] | list[str]) -> tuple[tuple[str, ...], int]:
    """The right answer and three distinct wrong ones from pool, in random order."""
    options = [right] + rng.sample([p for p in pool if p != right], 3)
    rng.shuffle(options)
    return tuple(options), options.index(right)


def _question(category: str, question: str, say, opts: tuple[str, ...], k: int) -> Question:
    """say(option) is the own-style answer sentence that option would make."""
    answers = tuple(say(o) for o in opts)
    return Question(category, question, answers[k], opts, k, answers)


def _count_answer(word: str) -> str:
    return "there is one shape." if word == "one" else f"there are {word} shapes."


def ask(scene: Scene, category: str, rng: random.Random) -> Question | None:
    """One question of a category about the scene; None when the scene cannot answer it
    (a relation needs two objects in one row or column)."""
    if category == "color":
        o = rng.choice(scene.objects)
        opts, k = _options(rng, o.color, sorted(COLORS))
        return _question(category, f"what color is the {o.shape}?", lambda c: f"the {o.shape} is {c}.", opts, k)
    if category == "shape":
        o = rng.choice(scene.objects)
        opts, k = _options(rng, o.shape, SHAPES)
        return _question(category, f"what shape is the {o.color} object?", lambda s: f"the {o.color} object is a {s}.", opts, k)
    if category == "position":
        o = rng.choice(scene.objects)
        opts, k = _options(rng, o.position, ALL_POSITIONS)
        return _question(category, f"where is the {o.name}?", lambda p: f"the {o.name} is at the {p}.", opts, k)
    if category == "count":
        opts, k = _options(rng, NUMBER_WORDS[scene.count - 1], NUMBER_WORDS)
        return _question(category, "how many shapes are there?", _count_answer, opts, k)
    if category == "relation":
        pairs = aligned_pairs(scene)
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        opts, k = _options(rng, relation(a, b), RELATIONS)
        return _question(category, f"where is the {a.name} relative to the {b.name}?",
                         lambda r: f"the {a.name} is {r} the {b.name}.", opts, k)
    raise ValueError(f"unknown category {category!r}")


def ask_each_category(scene: Scene, rng: random.Random) -> list[Question]:
    """At most one question per category, in CATEGORIES order (the benchmark's rows for a scene)."""
    return [q for c in CATEGORIES if (q := ask(scene, c, rng)) is not None]
