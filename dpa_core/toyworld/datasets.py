"""The world's data files: images, the two caption sets, instruction data and both benchmarks.
Pure functions of the seed (every random choice comes from a named random.Random stream), so the
same seed gives the same bytes."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import language
from .draw import max_jitter, png_bytes, render
from .facts import Person, make_people, text_bench
from .questions import CATEGORIES, LETTERS, Question, ask, ask_each_category, format_mcq
from .scenes import CONTENT_WORD_CLASSES, CONTENT_WORDS, Scene, sample_scenes
from .sizes import WorldSize

CAPTION_PROMPTS = {"terse": "Describe the image briefly.", "verbose": "Describe the image in detail."}
DESCRIBE_PROMPT = "describe the image."
P_DESCRIBE_TURN = 0.15  # share of instruction records with a full own-style description turn
P_MCQ_TURN = 0.3  # share of question turns asked as multiple choice (answered with a letter)


def rng_for(seed: int, stream: str) -> random.Random:
    """An independent random stream per purpose, so adding draws to one leaves the others unchanged."""
    return random.Random(f"toyworld:{seed}:{stream}")


@dataclass
class WorldData:
    train: list[Scene]
    bench: list[Scene]
    people: list[Person]
    captions: dict[str, list[dict]]  # style -> LLaVA records
    instruct: list[dict]
    bench_rows: list[dict]
    facts: list[dict]
    # Both caption styles for the benchmark scenes: held out from training, for the image-reliance diagnostic.
    heldout_captions: dict[str, list[dict]]


def make_world_data(ws: WorldSize, seed: int) -> WorldData:
    jitter = max_jitter(ws.image_size)
    # Benchmark scenes are drawn first, from the natural distribution, and their content (not only
    # their pixels) is then excluded from all training data.
    bench = sample_scenes(rng_for(seed, "bench-scenes"), ws.n_bench_images, ws.max_objects, jitter, unique=True)
    bench_keys = {s.key() for s in bench}
    train = sample_scenes(rng_for(seed, "train-scenes"), ws.n_train_images, ws.max_objects, jitter, exclude=bench_keys)
    reserved = set(CONTENT_WORDS) | {w.strip(",.!").lower() for t in _all_style_text() for w in t.split()}
    people = make_people(rng_for(seed, "people"), ws.n_entities, reserved)
    def verbose(scene: Scene, rng: random.Random) -> str:
        return language.verbose(scene, rng, style=ws.verbose_style)

    captions = {
        "terse": caption_records(train, "terse", language.terse, rng_for(seed, "terse")),
        "verbose": caption_records(train, "verbose", verbose, rng_for(seed, "verbose")),
    }
    instruct = instruct_records(train, ws, rng_for(seed, "instruct"))
    bench_rows = benchmark_rows(bench, rng_for(seed, "bench-questions"))
    facts = text_bench(people, rng_for(seed, "facts"))
    heldout = {style: caption_records(bench, style, fn, rng_for(seed, f"heldout-{style}"), split="bench")
               for style, fn in (("terse", language.terse), ("verbose", verbose))}
    return WorldData(train, bench, people, captions, instruct, bench_rows, facts, heldout)


def _all_style_text() -> list[str]:
    return [*language.OPENERS, *language.INTERJECTIONS, *language.VERBS, *language.EMBELLISHMENTS,
            *language.INTENSIFIERS, *language.FLOURISHES, *language.CANVASES, *language.CLOSERS]


def image_name(i: int) -> str:
    return f"{i:06d}.png"


def caption_records(scenes: list[Scene], style: str, caption, rng: random.Random, split: str = "train") -> list[dict]:
    """LLaVA-format caption records. Held-out ones (split != "train") also carry the scene in the LLM's
    own words ("scene_text"), for the image-reliance diagnostic's text oracle."""
    prompt = CAPTION_PROMPTS[style]
    return [
        {
            "id": f"{style}-{i:06d}" if split == "train" else f"{split}-{style}-{i:06d}",
            "image": f"{split}/{image_name(i)}",
            "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"},
                {"from": "gpt", "value": caption(scene, rng)},
            ],
        } | ({} if split == "train" else {"scene_text": language.own_style(scene)})
        for i, scene in enumerate(scenes)
    ]


def _turn(q: Question, rng: random.Random) -> tuple[str, str]:
    if rng.random() < P_MCQ_TURN:
        return format_mcq(q.question, q.options), q.letter
    return q.question, q.answer


def instruct_records(scenes: list[Scene], ws: WorldSize, rng: random.Random) -> list[dict]:
    """Multi-turn QA about each training image; categories differ within a record."""
    records = []
    for i, scene in enumerate(scenes):
        n_turns = rng.randint(ws.min_instruct_turns, ws.max_instruct_turns)
        turns = []
        if rng.random() < P_DESCRIBE_TURN:
            turns.append((DESCRIBE_PROMPT, language.own_style(scene)))
        for category in rng.sample(CATEGORIES, len(CATEGORIES)):
            if len(turns) >= n_turns:
                break
            q = ask(scene, category, rng)
            if q is not None:
                turns.append(_turn(q, rng))
        conversations = []
        for k, (human, gpt) in enumerate(turns):
            conversations.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + human})
            conversations.append({"from": "gpt", "value": gpt})
        records.append({"id": f"instruct-{i:06d}", "image": f"train/{image_name(i)}", "conversations": conversations})
    return records


def benchmark_rows(scenes: list[Scene], rng: random.Random) -> list[dict]:
    """One multiple-choice row per (bench image, answerable category)."""
    rows = []
    for i, scene in enumerate(scenes):
        for q in ask_each_category(scene, rng):
            row = {"index": len(rows), "image_file": f"bench/{image_name(i)}", "question": q.question}
            row.update({LETTERS[k]: q.options[k] for k in range(4)})
            # scene_text: the scene in the LLM's own words, for the text-oracle ceiling
            row.update({"answer": q.letter, "category": q.category, "scene_text": language.own_style(scene)})
            # cloze_A..D: each option's own-style answer sentence, for scoring without letters
            row.update({f"cloze_{LETTERS[k]}": q.option_answers[k] for k in range(4)})
            rows.append(row)
    return rows


# ---- writing -------------------------------------------------------------------------------

TSV_COLUMNS = ("index", "image", "question", "A", "B", "C", "D", "answer", "category", "scene_text",
               "cloze_A", "cloze_B", "cloze_C", "cloze_D")


def _dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_world_data(root: Path, data: WorldData, image_size: int) -> dict[str, Any]:
    """Write every data file under root (the temporary world directory); returns counts."""
    pngs = {}
    for split, scenes in (("train", data.train), ("bench", data.bench)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(scenes):
            blob = png_bytes(render(scene, image_size))
            (root / "images" / split / image_name(i)).write_bytes(blob)
            pngs[f"{split}/{image_name(i)}"] = blob
    for style, records in data.captions.items():
        _dump_json(root / "captions" / f"{style}.json", records)
    _dump_json(root / "instruct" / "train.json", data.instruct)
    for style, records in data.heldout_captions.items():
        _dump_json(root / "heldout" / f"captions_{style}.json", records)
    _dump_json(root / "heldout" / "content_words.json", {k: list(v) for k, v in CONTENT_WORD_CLASSES.items()})

    lines = ["\t".join(TSV_COLUMNS)]
    for row in data.bench_rows:
        b64 = base64.b64encode(pngs[row["image_file"]]).decode("ascii")
        lines.append("\t".join(str(row[c]) if c != "image" else b64 for c in TSV_COLUMNS))
    (root / "bench").mkdir(parents=True, exist_ok=True)
    (root / "bench" / "toy_mcq.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    (root / "text_bench").mkdir(parents=True, exist_ok=True)
    (root / "text_bench" / "facts.jsonl").write_text(
        "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in data.facts), encoding="utf-8")
    return {
        "train_images": len(data.train),
        "bench_images": len(data.bench),
        "terse_records": len(data.captions["terse"]),
        "verbose_records": len(data.captions["verbose"]),
        "instruct_records": len(data.instruct),
        "instruct_turns": sum(len(r["conversations"]) // 2 for r in data.instruct),
        "heldout_caption_records": {style: len(r) for style, r in data.heldout_captions.items()},
        "bench_rows": len(data.bench_rows),
        "bench_rows_per_category": {c: sum(r["category"] == c for r in data.bench_rows) for c in CATEGORIES},
        "text_bench_items": len(data.facts),
        "people": len(data.people),
    }
