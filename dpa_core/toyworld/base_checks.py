"""Sanity checks of the bootstrapped LLM, for the manifest: does it know its facts, and does it
answer in chat form? (The study compares later models against these numbers.)"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .chat import render_chat
from .facts import Person
from .language import own_style
from .questions import LETTERS, ask_each_category, format_mcq
from .scenes import Scene


@torch.no_grad()
def _logprob(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompt: str, continuation: str) -> float:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))


def text_bench_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerFast, items: list[dict], people: list[Person]) -> float:
    """Each choice scored as the assistant's full answer sentence in chat form (the answers in the
    pretraining chats read "<name> lives in <town>." etc.), the best-scoring choice is the guess."""
    answers = {q: (answer, right) for p in people for q, answer, right, _ in p.questions()}
    prompt_of = lambda q: render_chat([{"role": "user", "content": q}]) + "<|im_start|>assistant\n"  # noqa: E731
    hits = 0
    for item in items:
        answer, right = answers[item["question"]]
        stem = answer[: answer.rindex(right)]
        scores = [_logprob(model, tok, prompt_of(item["question"]), f"{stem}{choice}.") for choice in item["choices"]]
        hits += int(max(range(4), key=scores.__getitem__) == item["answer"])
    return hits / len(items)


def scene_text_mcq_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerFast, rows: list[dict],
                            scenes: list[Scene]) -> float:
    """The benchmark's questions with the scene given as own-style TEXT instead of the image: what
    the LLM can do when it is told what the image shows (letters scored by probability)."""
    letter_ids = [tok(letter, add_special_tokens=False)["input_ids"][0] for letter in LETTERS]
    hits = 0
    for row in rows:
        scene = scenes[int(row["image_file"].split("/")[-1].split(".")[0])]
        user = f"{own_style(scene)}\n{format_mcq(row['question'], [row[k] for k in LETTERS])}"
        ids = tok(render_chat([{"role": "user", "content": user}]) + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        hits += int(LETTERS[int(logits[letter_ids].argmax())] == row["answer"])
    return hits / max(1, len(rows))


@torch.no_grad()
def chat_sample(model: PreTrainedModel, tok: PreTrainedTokenizerFast, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to a question, through the saved chat template."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def scene_text_reading(model: PreTrainedModel, tok: PreTrainedTokenizerFast, scenes: list[Scene],
                       rng: random.Random) -> dict[str, float]:
    """Can the LLM read a scene told in its own words? One question per category per scene, the
    scene as own-style text, each option's whole answer sentence scored (the cloze formulation, as
    the benchmark's cloze mode); accuracy overall, per category and per number of objects
    (n1..n4: one object means one colour word in the context, so copying alone answers it)."""
    was_training = model.training
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hits: dict[str, list[int]] = {}
    for scene in scenes:
        for q in ask_each_category(scene, rng):
            prompt = tok(render_chat([{"role": "user", "content": f"{own_style(scene)}\n{q.question}"}])
                         + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
            answers = [tok(a, add_special_tokens=False)["input_ids"] for a in q.option_answers]
            ids = torch.full((len(answers), len(prompt) + max(map(len, answers))), pad, dtype=torch.long)
            for k, a in enumerate(answers):
                ids[k, : len(prompt) + len(a)] = torch.tensor(prompt + a)
            logp = model(input_ids=ids).logits.float().log_softmax(-1)  # right padding: the answers' logits are unaffected
            scores = [sum(logp[k, len(prompt) - 1 + j, t].item() for j, t in enumerate(a)) for k, a in enumerate(answers)]
            right = int(max(range(len(scores)), key=scores.__getitem__) == q.correct)
            for key in ("overall", q.category, f"n{scene.count}"):
                h = hits.setdefault(key, [0, 0])
                h[0] += right
                h[1] += 1
    model.train(was_training)
    return {k: round(h[0] / h[1], 4) for k, h in hits.items()}
