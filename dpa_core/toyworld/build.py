"""build_world: data files, tokenizer, base LLM, vision tower and the prior-gap metric, written
into a temporary directory that becomes OUT only when everything succeeded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import transformers
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel

from dpa_core.errors import DPAInputError
from dpa_core.io import atomic_dir, write_json_atomic

from . import language
from .base_checks import chat_sample, scene_text_mcq_accuracy, scene_text_reading, text_bench_accuracy
from .clip import encode_texts, make_clip, make_processor, pixel_values, retrieval_accuracy, train_clip
from .corpus import first_lessons, llm_corpus
from .datasets import WorldData, image_name, make_world_data, rng_for, write_world_data
from .draw import render
from .llm import make_llm, pretrain, save_llm, tokenized_corpus
from .prior_gap import prior_gap
from .sizes import WorldSize, resolve_size
from .tokenizer import train_tokenizer


def _tokenizer_texts(corpus: list[str], data: WorldData) -> list[str]:
    """Every register the world speaks, so that no style is out of vocabulary."""
    texts = list(corpus)
    for records in [*data.captions.values(), data.instruct]:
        texts += [turn["value"].replace("<image>\n", "") for r in records for turn in r["conversations"]]
    texts += [" ".join([row["question"], row["A"], row["B"], row["C"], row["D"]]) for row in data.bench_rows]
    texts += [" ".join([item["question"], *item["choices"]]) for item in data.facts]
    return texts


def _bytes_on_disk(root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    allocated = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            top = path.relative_to(root).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
            allocated += path.stat().st_blocks * 512
    return {"total": sum(sizes.values()), "allocated": allocated, "by_dir": sizes}


DATA_ONLY_FIELDS = frozenset({"min_instruct_turns", "max_instruct_turns", "ppl_texts", "verbose_style"})
BASE_MANIFEST = "manifest.json"
# Size fields added after base models were shipped, with the value that changes nothing.
FIELDS_ADDED_LATER = {"llm_first_lessons_steps": 0, "llm_scene_recap": 0.0}
PROBE_SCENES = 240  # benchmark scenes the reading probe asks about (one question per category each)


def base_fingerprint(ws: WorldSize, seed: int, bench: list) -> str:
    """What the base models depend on: the seed, every size field except the data-only ones, and
    the benchmark's content (which the LLM corpus and CLIP's training images exclude)."""
    settings = {k: v for k, v in dataclasses.asdict(ws).items() if k not in DATA_ONLY_FIELDS}
    for k, neutral in FIELDS_ADDED_LATER.items():  # at their neutral value, older builds keep their fingerprint
        if settings.get(k) == neutral:
            del settings[k]
    payload = {
        "seed": seed,
        "settings": settings,
        "bench_keys": sorted(repr(s.key()) for s in bench),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_world(out_dir: str | os.PathLike, size: str = "default", seed: int = 0,
                overrides: Mapping[str, Any] | None = None, base_models: str | os.PathLike | None = None) -> dict:
    """Build the toy world into out_dir (replaced atomically) and return its manifest.

    base_models: a directory written by build_base_models for the same size and seed (the
    project ships one for the default world): its tokenizer, LLM and vision tower are copied
    instead of trained, so the world stage only builds data. None trains them here."""
    ws = _check_seed(size, seed, overrides)
    with _one_thread():
        return _build(Path(out_dir), size, ws, seed, Path(base_models) if base_models is not None else None)


def build_base_models(out_dir: str | os.PathLike, size: str = "default", seed: int = 0,
                      overrides: Mapping[str, Any] | None = None, probe_every: int = 0) -> dict:
    """Train the world's tokenizer, base LLM and vision tower into out_dir/{llm,clip} with a
    manifest; build_world(base_models=out_dir) then reuses them (like downloaded weights).
    probe_every > 0: every that many LLM steps, measure how well it reads a scene told in words
    (base_checks.scene_text_reading on the benchmark's scenes), print it, and keep the learning
    curve in the manifest ("llm_reading_curve"); the probe only reads, the models are the same."""
    ws = _check_seed(size, seed, overrides)
    with _one_thread(), atomic_dir(out_dir) as root:
        data = make_world_data(ws, seed)
        stats = _train_models(root, ws, seed, data, probe_every)
        manifest = {
            "seed": seed,
            "size": size if isinstance(size, str) else "custom",
            "settings": dataclasses.asdict(ws),
            "fingerprint": base_fingerprint(ws, seed, data.bench),
            "command": f"python -m dpa_core.toyworld --base-models-only --out {out_dir} --size {size} --seed {seed}"
                       + "".join(f" --set {k}={v}" for k, v in sorted((overrides or {}).items())),
            **stats,
            "versions": _versions(),
        }
        write_json_atomic(root / BASE_MANIFEST, manifest)
    return manifest


def _check_seed(size, seed, overrides) -> WorldSize:
    ws = resolve_size(size, overrides)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DPAInputError(f"seed must be a non-negative integer, got {seed!r}.")
    return ws


@contextmanager
def _one_thread() -> Iterator[None]:
    # Tokenizers' Rust thread pool keeps spinning after a parallel encode and starves torch's
    # OpenMP threads: on 2 cores, training then runs ~10x slower.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One torch thread: these models are too small to gain much from a second core, and on a busy
    # machine OpenMP's spinning threads made a smoke build 10x slower (measured: 0.07 s vs
    # 0.8-2 s per LLM step). One thread also makes the float results independent of the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stopwatch(timings: dict[str, float]):
    """lap(name) records the seconds since the previous lap (or since this call) under name."""
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    return lap


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _train_models(root: Path, ws: WorldSize, seed: int, data: WorldData, probe_every: int = 0) -> dict:
    """Tokenizer + LLM into root/llm, CLIP into root/clip; returns their statistics and timings."""
    timings: dict[str, float] = {}
    lap = _stopwatch(timings)

    with torch.random.fork_rng():
        corpus = llm_corpus(ws, rng_for(seed, "llm-corpus"), data.people, {s.key() for s in data.bench})
        # The tokenizer sees the full verbose register whatever the style dial, so that the base
        # models (and the vocabulary) do not depend on a data-only setting.
        full_style = data if ws.verbose_style == 1.0 else make_world_data(dataclasses.replace(ws, verbose_style=1.0), seed)
        tok = train_tokenizer(_tokenizer_texts(corpus, full_style), ws.vocab_size, ws.llm_max_positions)
        lap("tokenizer")

        torch.manual_seed(seed)
        llm = make_llm(ws, tok)
        lessons = None
        if ws.llm_first_lessons_steps:
            exclude = {s.key() for s in data.bench}
            lessons = tokenized_corpus(tok, first_lessons(ws, rng_for(seed, "llm-first-lessons"), exclude))
        curve: list[dict] = []

        def probe(step: int, model) -> None:
            if probe_every and (step + 1) % probe_every == 0:
                reading = scene_text_reading(model, tok, data.bench[:PROBE_SCENES], rng_for(seed, "reading-probe"))
                curve.append({"step": step + 1, **reading})
                print(json.dumps(curve[-1]), flush=True)

        llm_stats = pretrain(llm, tokenized_corpus(tok, corpus), ws, seed, first_lessons=lessons, on_step=probe)
        save_llm(llm, tok, root / "llm")
        lap("llm")

        torch.manual_seed(seed + 1)
        processor = make_processor(ws.image_size)
        clip = make_clip(ws, tok)
        # The PNGs the world writes are lossless, so rendering here gives the same pixels.
        negative_rng = rng_for(seed, "clip-negatives")
        negatives = [language.shape_swapped(s, negative_rng) for s in data.train]
        # Positives and hard negatives encoded together: one width, as they share a batch.
        ids, mask = encode_texts(tok, [language.clip_text(s) for s in [*data.train, *negatives]], ws.clip_text_max_len)
        n = len(data.train)
        train_ids, train_mask, negative_ids, negative_mask = ids[:n], mask[:n], ids[n:], mask[n:]
        train_pixels = pixel_values(processor, [render(s, ws.image_size) for s in data.train])
        clip_stats = train_clip(clip, train_pixels, train_ids, train_mask, ws, seed, negative_ids, negative_mask)
        clip.save_pretrained(root / "clip")
        processor.save_pretrained(root / "clip")
        lap("clip")
    stats = {"llm": llm_stats, "clip": clip_stats, "llm_corpus_docs": len(corpus), "timings_s": timings}
    return {**stats, "llm_reading_curve": curve} if curve else stats


def _copy_base_models(src: Path, dest: Path, ws: WorldSize, seed: int, data: WorldData) -> dict:
    manifest_path = src / BASE_MANIFEST
    rebuild = (f"python -m dpa_core.toyworld --base-models-only --out {src} --size <size> --seed {seed}, "
               "or set world.base_models: null to train them in the world stage")
    if not manifest_path.is_file():
        raise DPAInputError(f"no base models at {src} (missing {BASE_MANIFEST}).", file=manifest_path, fix=rebuild + ".")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    want = base_fingerprint(ws, seed, data.bench)
    if manifest.get("fingerprint") != want:
        raise DPAInputError(
            f"the base models in {src} were built for another world (seed {manifest.get('seed')}, "
            f"size {manifest.get('size')}); this world is seed {seed} with other settings.",
            file=manifest_path, fix=rebuild + ".")
    for name in ("llm", "clip"):
        shutil.copytree(src / name, dest / name)
    return manifest


def _without_timings(d):
    """The manifest as written: every `timings_s` (wall clock, different on every build) left out."""
    if isinstance(d, dict):
        return {k: _without_timings(v) for k, v in d.items() if k != "timings_s"}
    return d


def _build(out_dir: Path, size: str | WorldSize, ws: WorldSize, seed: int, base_models: Path | None) -> dict:
    timings: dict[str, float] = {}
    lap = _stopwatch(timings)

    with atomic_dir(out_dir) as root:
        data = make_world_data(ws, seed)
        counts = write_world_data(root, data, ws.image_size)
        lap("data")

        if base_models is None:
            stats = _train_models(root / "models", ws, seed, data)
            base = {"source": "trained in the world stage", **stats}
        else:
            shipped = _copy_base_models(base_models, root / "models", ws, seed, data)
            base = {"source": str(base_models), "llm": shipped["llm"], "clip": shipped["clip"],
                    "llm_corpus_docs": shipped["llm_corpus_docs"], "timings_s": shipped["timings_s"],
                    "command": shipped["command"]}
        lap("models")

        tok = AutoTokenizer.from_pretrained(root / "models" / "llm")
        llm = AutoModelForCausalLM.from_pretrained(root / "models" / "llm").eval()
        clip = CLIPModel.from_pretrained(root / "models" / "clip").eval()
        processor = make_processor(ws.image_size)
        bench_ids, bench_mask = encode_texts(tok, [language.clip_text(s) for s in data.bench], ws.clip_text_max_len)
        bench_pixels = pixel_values(processor, [Image.open(root / "images" / "bench" / image_name(i)).convert("RGB")
                                                for i in range(len(data.bench))])

        n = ws.ppl_texts
        own_rng = rng_for(seed, "own-style-held-out")
        gap = prior_gap(llm, tok, {
            "own_style": [language.own_style_any(s, own_rng) for s in data.bench[:n]],
            "terse": [r["conversations"][1]["value"] for r in data.captions["terse"][:n]],
            "verbose": [r["conversations"][1]["value"] for r in data.captions["verbose"][:n]],
        })
        write_json_atomic(root / "metrics" / "prior_gap.json", gap)
        checks = {
            "llm": base["llm"],
            "llm_params": sum(p.numel() for p in llm.parameters()),
            "text_bench_acc_base_llm": text_bench_accuracy(llm, tok, data.facts, data.people),
            "text_bench_chance": 0.25,
            "scene_text_mcq_acc_base_llm": scene_text_mcq_accuracy(llm, tok, data.bench_rows[: 2 * n], data.bench),
            # the same, each option's answer sentence scored (cloze), per category and object count
            "scene_text_reading_base_llm": scene_text_reading(llm, tok, data.bench[:PROBE_SCENES],
                                                              rng_for(seed, "reading-probe")),
            "chat_sample": {"question": data.facts[0]["question"], "answer": chat_sample(llm, tok, data.facts[0]["question"])},
            "clip": {**base["clip"], "bench_retrieval_acc_in_32": retrieval_accuracy(clip, bench_pixels, bench_ids, bench_mask)},
            "clip_params": sum(p.numel() for p in clip.parameters()),
        }
        lap("metrics")

        manifest = {
            "seed": seed,
            "size": size if isinstance(size, str) else "custom",
            "settings": dataclasses.asdict(ws),
            "counts": {**counts, "vocab_size": len(tok), "llm_corpus_docs": base["llm_corpus_docs"]},
            "base_models": {k: v for k, v in base.items() if k in ("source", "command", "timings_s")},
            "prior_gap_ppl": gap["ppl"],
            "checks": checks,
            "timings_s": {**timings, "total": round(sum(timings.values()), 3)},
            "bytes": _bytes_on_disk(root),
            "versions": _versions(),
        }
        # timings_s is returned, not written: the world is a DVC output, same inputs -> same bytes
        write_json_atomic(root / "manifest.json", _without_timings(manifest))
    return manifest
