"""Plain facts: made-up people with a home town, a favourite food and a pet. The base LLM learns
them in pretraining; the text-only benchmark asks about them, to see whether multimodal training
makes the LLM forget what it knew. They share no words with the visual world on purpose."""

from __future__ import annotations

import random
from dataclasses import dataclass

TOWNS = ("marn", "oskel", "tibra", "vell", "quon", "dresk", "palu", "zenth")
FOODS = ("apples", "bread", "cheese", "soup", "rice", "plums", "honey", "fish")
PETS = ("cat", "dog", "horse", "goat", "owl", "frog", "rabbit", "mouse")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    food: str
    pet: str

    def statements(self) -> list[str]:
        return [f"{self.name} lives in {self.town}.", f"{self.name} likes {self.food}.", f"{self.name} has a pet {self.pet}."]

    def faq_lines(self) -> list[str]:
        """The same facts as question-and-answer lines, e.g. "where does bilom live? marn." """
        return [f"{q} {right}." for q, _answer, right, _pool in self.questions()]

    def questions(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(question, open answer, right value, all values of that kind) for each fact."""
        s = self.statements()
        return [
            (f"where does {self.name} live?", s[0], self.town, TOWNS),
            (f"what food does {self.name} like?", s[1], self.food, FOODS),
            (f"what pet does {self.name} have?", s[2], self.pet, PETS),
        ]


def make_people(rng: random.Random, n: int, reserved: set[str]) -> list[Person]:
    """n people with distinct made-up names (consonant-vowel-consonant-vowel-consonant) that
    collide with no word in `reserved`."""
    taken = set(reserved)
    people = []
    while len(people) < n:
        name = "".join(rng.choice(_CONSONANTS if i % 2 == 0 else _VOWELS) for i in range(5))
        if name in taken:
            continue
        taken.add(name)
        people.append(Person(name, rng.choice(TOWNS), rng.choice(FOODS), rng.choice(PETS)))
    return people


def text_bench(people: list[Person], rng: random.Random) -> list[dict]:
    """One four-choice item per fact: {"id", "question", "choices", "answer"}."""
    items = []
    for person in people:
        for question, _answer, right, pool in person.questions():
            choices = [right] + rng.sample([v for v in pool if v != right], 3)
            rng.shuffle(choices)
            items.append({"id": f"fact-{len(items):04d}", "question": question, "choices": choices, "answer": choices.index(right)})
    return items
