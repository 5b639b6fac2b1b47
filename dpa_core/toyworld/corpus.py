"""The base LLM's pretraining corpus, all in its OWN style: plain scene descriptions (text only),
the fact sheets, and chat conversations (so it behaves like an Instruct model). No caption
text is in it; verbose-register text only if n_llm_florid_docs > 0 (0 by default)."""

from __future__ import annotations

import random

from . import language
from .chat import END_OF_TEXT, render_chat
from .draw import max_jitter
from .facts import Person
from .questions import CATEGORIES, ask, format_mcq
from .scenes import Scene, sample_scenes
from .sizes import WorldSize

P_FACT_CHAT = 0.15  # share of chat conversations about facts (the rest: scenes given as text)
# Questions per scene chat. Many per description: reading the answer out of the context is the
# skill an MLLM needs later, and a tiny model needs many examples of it (a 256-token window holds
# the description and about six of them).
SCENE_CHAT_TURNS = (7, 11)
P_MCQ = 0.25  # share of scene questions asked as multiple choice


def _scene_turns(scene: Scene, rng: random.Random, n_turns: int) -> list[dict[str, str]]:
    """A conversation about a scene the user describes in words (the LLM has no eyes yet).
    Several questions per description: reading the answer out of the context is the skill an
    MLLM needs later, and a tiny model needs many examples of it."""
    messages = []
    for _ in range(4 * n_turns):
        if len(messages) // 2 >= n_turns:
            break
        q = ask(scene, rng.choice(CATEGORIES), rng)
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


def _scene_doc(ws: WorldSize, scene: Scene, rng: random.Random) -> str:
    """A plain scene document; with probability ws.llm_scene_recap a recap: the full description, then
    the scene told again in one of the own-style forms (`own_style_any`: the full description again or a
    shorter mention with the objects shuffled), as a caption follows its image. At 0 no random number is
    drawn, so the corpus is the one the shipped models saw."""
    if ws.llm_scene_recap and rng.random() < ws.llm_scene_recap:
        return f"{language.own_style(scene)}\n{language.own_style_any(scene, rng)}"
    return language.own_style_any(scene, rng)


def _fact_turns(people: list[Person], rng: random.Random, n_turns: int) -> list[dict[str, str]]:
    messages = []
    for _ in range(n_turns):
        question, answer, _right, _pool = rng.choice(rng.choice(people).questions())
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def llm_corpus(ws: WorldSize, rng: random.Random, people: list[Person], exclude_keys: set) -> list[str]:
    """Documents (each ending in <|endoftext|>) in a seeded random order. Scenes whose content is
    in exclude_keys (the benchmark's) never appear, so own-style text about them stays held out."""
    docs = []
    scenes = sample_scenes(rng, ws.n_llm_scene_docs, ws.max_objects, max_jitter(ws.image_size), exclude=exclude_keys)
    docs += [_scene_doc(ws, s, rng) for s in scenes]
    for _ in range(ws.n_llm_fact_docs):
        # A dense fact sheet about a few people; each fact as a statement or as an FAQ line, so
        # it is known in more than one frame.
        lines = []
        for person in rng.sample(people, min(len(people), rng.randint(2, 5))):
            lines += [rng.choice(pair) for pair in zip(person.statements(), person.faq_lines())]
        rng.shuffle(lines)
        docs.append(" ".join(lines))
    florid_scenes = sample_scenes(rng, ws.n_llm_florid_docs, ws.max_objects, max_jitter(ws.image_size), exclude=exclude_keys)
    docs += [language.verbose(s, rng) for s in florid_scenes]
    chat_scenes = sample_scenes(rng, ws.n_llm_chat_docs, ws.max_objects, max_jitter(ws.image_size), exclude=exclude_keys)
    for scene in chat_scenes:
        if rng.random() < P_FACT_CHAT:
            docs.append(render_chat(_fact_turns(people, rng, rng.randint(1, 3))))
        else:
            docs.append(render_chat(_scene_turns(scene, rng, rng.randint(*SCENE_CHAT_TURNS))))
    rng.shuffle(docs)
    return [d + END_OF_TEXT for d in docs]


def first_lessons(ws: WorldSize, rng: random.Random, exclude_keys: set) -> list[str]:
    """The corpus of the LLM's first steps (ws.llm_first_lessons_steps): scenes of ONE object only,
    as plain descriptions and as scene chats, in the proportions of llm_corpus. With one object in
    the context, every answer is a copy of a word the description holds (its only colour, its only
    shape, its position), so copying is the best predictor from the first step.

    Why: measured on the default world, the LLM pretrained on the full corpus does not copy a colour
    out of its context even when the scene has one object (probe 0.25 after 3000 steps), while the
    same model trained on one-object scenes alone copies it by step 1000 (docs/toyworld.md). Small
    attention models form copying heads quickly on data where copying pays, and keep them."""
    jitter = max_jitter(ws.image_size)
    n_scene, n_chat = ws.n_llm_scene_docs // 3, ws.n_llm_chat_docs // 3
    docs = [_scene_doc(ws, s, rng) for s in sample_scenes(rng, n_scene, 1, jitter, exclude=exclude_keys)]
    docs += [render_chat(_scene_turns(s, rng, rng.randint(*SCENE_CHAT_TURNS)))
             for s in sample_scenes(rng, n_chat, 1, jitter, exclude=exclude_keys)]
    rng.shuffle(docs)
    return [d + END_OF_TEXT for d in docs]
