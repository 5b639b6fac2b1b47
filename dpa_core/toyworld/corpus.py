"""The base LLM's pretraining corpus, all in its OWN style: plain scene descriptions (text only),
the fact sheets, and chat conversations (so it behaves like an Instruct model). No terse or
verbose caption text is in it: those registers are the captions' business."""

from __future__ import annotations

import random

from . import language
from .chat import END_OF_TEXT, render_chat
from .facts import Person
from .questions import CATEGORIES, ask, format_mcq
from .scenes import Scene, sample_scenes
from .sizes import WorldSize

P_FACT_CHAT = 0.4  # share of chat conversations about facts (the rest: scenes given as text)
P_MCQ = 0.25  # share of scene questions asked as multiple choice


def _scene_turns(scene: Scene, rng: random.Random, n_turns: int) -> list[dict[str, str]]:
    """A conversation about a scene the user describes in words (the LLM has no eyes yet)."""
    messages = []
    for category in rng.sample(CATEGORIES, len(CATEGORIES)):
        if len(messages) // 2 >= n_turns:
            break
        q = ask(scene, category, rng)
        if q is None:
            continue
        if rng.random() < P_MCQ:
            user, assistant = format_mcq(q.question, q.options), q.letter
        else:
            user, assistant = q.question, q.answer
        if not messages:
            user = f"{language.own_style(scene)}\n{user}"
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def _fact_turns(people: list[Person], rng: random.Random, n_turns: int) -> list[dict[str, str]]:
    messages = []
    for _ in range(n_turns):
        question, answer, _right, _pool = rng.choice(rng.choice(people).questions())
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def llm_corpus(ws: WorldSize, rng: random.Random, people: list[Person], exclude_keys: set) -> list[str]:
    """Documents (each ending in <|endoftext|>) in a seeded random order. Scenes whose content is
    in exclude_keys (the benchmark's) never appear, so own-style text about them stays held out."""
    from .draw import max_jitter

    docs = []
    scenes = sample_scenes(rng, ws.n_llm_scene_docs, ws.max_objects, max_jitter(ws.image_size), exclude=exclude_keys)
    docs += [language.own_style(s) for s in scenes]
    for person in people:
        for _ in range(ws.fact_repeats):
            statements = person.statements()
            rng.shuffle(statements)
            docs.append(" ".join(statements))
    chat_scenes = sample_scenes(rng, ws.n_llm_chat_docs, ws.max_objects, max_jitter(ws.image_size), exclude=exclude_keys)
    for scene in chat_scenes:
        n_turns = rng.randint(1, 3)
        if rng.random() < P_FACT_CHAT:
            docs.append(render_chat(_fact_turns(people, rng, n_turns)))
        else:
            docs.append(render_chat(_scene_turns(scene, rng, n_turns)))
    rng.shuffle(docs)
    return [d + END_OF_TEXT for d in docs]
