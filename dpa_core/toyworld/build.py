"""build_world: data files, tokenizer, base LLM, vision tower and the prior-gap metric, written
into a temporary directory that becomes OUT only when everything succeeded."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers
from PIL import Image

from dpa_core.errors import DPAInputError
from dpa_core.io import atomic_dir, write_json_atomic

from . import language
from .base_checks import chat_sample, scene_text_mcq_accuracy, text_bench_accuracy
from .clip import encode_texts, make_clip, make_processor, pixel_values, retrieval_accuracy, train_clip
from .corpus import llm_corpus
from .datasets import WorldData, image_name, make_world_data, rng_for, write_world_data
from .llm import make_llm, pretrain, save_llm, token_stream
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


def build_world(out_dir: str | os.PathLike, size: str = "default", seed: int = 0,
                overrides: Mapping[str, Any] | None = None) -> dict:
    """Build the toy world into out_dir (replaced atomically) and return its manifest."""
    ws = resolve_size(size, overrides)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DPAInputError(f"seed must be a non-negative integer, got {seed!r}.")
    # Tokenizers' Rust thread pool keeps spinning after a parallel encode and starves torch's
    # OpenMP threads: on 2 cores, training then runs ~10x slower.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One torch thread: these models are too small to gain much from a second core, and on a busy
    # machine OpenMP's spinning threads made a smoke build 10x slower (measured: 0.07 s vs
    # 0.8-2 s per LLM step). One thread also makes the float results independent of the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(Path(out_dir), size, ws, seed)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, size: str | WorldSize, ws: WorldSize, seed: int) -> dict:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    with atomic_dir(out_dir) as root, torch.random.fork_rng():
        data = make_world_data(ws, seed)
        counts = write_world_data(root, data, ws.image_size)
        lap("data")

        bench_keys = {s.key() for s in data.bench}
        corpus = llm_corpus(ws, rng_for(seed, "llm-corpus"), data.people, bench_keys)
        tok = train_tokenizer(_tokenizer_texts(corpus, data), ws.vocab_size, ws.llm_max_positions)
        lap("tokenizer")

        torch.manual_seed(seed)
        llm = make_llm(ws, tok)
        llm_stats = pretrain(llm, *token_stream(tok, corpus), ws, seed)
        save_llm(llm, tok, root / "models" / "llm")
        lap("llm")

        torch.manual_seed(seed + 1)
        processor = make_processor(ws.image_size)
        clip = make_clip(ws, tok)

        def load(split: str, n: int) -> torch.Tensor:
            return pixel_values(processor, [Image.open(root / "images" / split / image_name(i)).convert("RGB") for i in range(n)])

        train_ids, train_mask = encode_texts(tok, [language.clip_text(s) for s in data.train], ws.clip_text_max_len)
        clip_stats = train_clip(clip, load("train", len(data.train)), train_ids, train_mask, ws, seed)
        bench_ids, bench_mask = encode_texts(tok, [language.clip_text(s) for s in data.bench], ws.clip_text_max_len)
        clip_stats["bench_retrieval_acc_in_32"] = retrieval_accuracy(clip, load("bench", len(data.bench)), bench_ids, bench_mask)
        clip.save_pretrained(root / "models" / "clip")
        processor.save_pretrained(root / "models" / "clip")
        lap("clip")

        n = ws.ppl_texts
        own_rng = rng_for(seed, "own-style-held-out")
        gap = prior_gap(llm, tok, {
            "own_style": [language.own_style_any(s, own_rng) for s in data.bench[:n]],
            "terse": [r["conversations"][1]["value"] for r in data.captions["terse"][:n]],
            "verbose": [r["conversations"][1]["value"] for r in data.captions["verbose"][:n]],
        })
        write_json_atomic(root / "metrics" / "prior_gap.json", gap)
        checks = {
            "llm": llm_stats,
            "llm_params": sum(p.numel() for p in llm.parameters()),
            "text_bench_acc_base_llm": text_bench_accuracy(llm, tok, data.facts, data.people),
            "text_bench_chance": 0.25,
            "scene_text_mcq_acc_base_llm": scene_text_mcq_accuracy(llm, tok, data.bench_rows[: 2 * n], data.bench),
            "chat_sample": {"question": data.facts[0]["question"], "answer": chat_sample(llm, tok, data.facts[0]["question"])},
            "clip": clip_stats,
            "clip_params": sum(p.numel() for p in clip.parameters()),
        }
        lap("metrics")

        manifest = {
            "seed": seed,
            "size": size if isinstance(size, str) else "custom",
            "settings": dataclasses.asdict(ws),
            "counts": {**counts, "vocab_size": len(tok), "llm_corpus_docs": len(corpus)},
            "prior_gap_ppl": gap["ppl"],
            "checks": checks,
            "timings_s": {**timings, "total": round(sum(timings.values()), 3)},
            "bytes": _bytes_on_disk(root),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
        }
        # timings_s is returned, not written: the world is a DVC output, same inputs -> same bytes
        write_json_atomic(root / "manifest.json", {k: v for k, v in manifest.items() if k != "timings_s"})
    return manifest
