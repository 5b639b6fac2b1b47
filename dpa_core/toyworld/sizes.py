"""World sizes: every knob of a toy world (data counts, image size, model widths, training steps)
is a field of one frozen dataclass, so a size is a plain value that goes into the manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from dpa_core.errors import DPAInputError


@dataclass(frozen=True)
class WorldSize:
    # images and the data built on them
    image_size: int
    n_train_images: int
    n_bench_images: int
    max_objects: int  # objects per scene, 1..4 (4 shapes, each used at most once per scene)
    min_instruct_turns: int
    max_instruct_turns: int
    # plain facts the base LLM learns (the text-only benchmark asks about them)
    n_entities: int
    # the base LLM's own pretraining corpus
    n_llm_scene_docs: int  # plain scene descriptions (text only, no images)
    n_llm_chat_docs: int  # chat-formatted QA (about facts, and about scenes given as text)
    n_llm_fact_docs: int  # fact sheets (a few people's facts each)
    # Verbose-register texts in the LLM's corpus: 0 (the default) keeps that register unseen,
    # the sharpest conflict; a few hundred make it familiar-but-dispreferred, closer to a real
    # LLM that has read some florid prose. A dial for the study, not a tuned value.
    n_llm_florid_docs: int
    # The register-conflict dial on the data side (0..1): the share of style elements kept in the
    # verbose captions (language.verbose). 1 is the full florid register, 0 plain sentences with
    # the same facts. Data only: the base models do not depend on it, so sweeping it reuses them.
    verbose_style: float
    # tokenizer
    vocab_size: int
    # base LLM (Qwen2ForCausalLM)
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    llm_max_positions: int
    llm_block: int  # training window in tokens
    llm_batch: int
    llm_steps: int
    llm_lr: float
    # The first llm_first_lessons_steps of the llm_steps draw their windows from one-object scene
    # descriptions and chats (corpus.first_lessons), where copying a word out of the context is the
    # only way to predict an answer; 0: no such phase (the shipped default-seed0 models).
    llm_first_lessons_steps: int
    # The share (0..1) of plain scene documents that are recaps: the full description, then the same
    # scene told again in an own-style form, the way a caption follows its image. 0: none (the shipped
    # default-seed0 models). Measured: the shipped LLM, handed a scene in words, does not copy its
    # colours and shapes into a description that follows (docs/toyworld.md, "Alignment teaches no
    # visual words"), which is what LLaVA's alignment asks of a frozen LLM.
    llm_scene_recap: float
    # vision tower (CLIPModel, trained contrastively)
    clip_patch: int
    clip_hidden: int
    clip_layers: int
    clip_heads: int
    clip_intermediate: int
    clip_projection: int
    clip_text_max_len: int
    clip_batch: int
    clip_steps: int
    clip_lr: float
    # measurement
    ppl_texts: int  # texts per style for metrics/prior_gap.json


SIZES: dict[str, WorldSize] = {
    # CI: the whole build in well under a minute on 2 cores.
    "smoke": WorldSize(
        image_size=32, n_train_images=160, n_bench_images=24, max_objects=4,
        min_instruct_turns=2, max_instruct_turns=3,
        n_entities=8, n_llm_scene_docs=1200, n_llm_chat_docs=1200, n_llm_fact_docs=800, n_llm_florid_docs=0,
        verbose_style=1.0, vocab_size=768,
        llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_intermediate=192,
        llm_max_positions=512, llm_block=128, llm_batch=16, llm_steps=300, llm_lr=6e-3, llm_first_lessons_steps=0,
        llm_scene_recap=0.0,
        clip_patch=8, clip_hidden=64, clip_layers=2, clip_heads=2, clip_intermediate=128,
        clip_projection=32, clip_text_max_len=48, clip_batch=64, clip_steps=100, clip_lr=1e-3,
        ppl_texts=48,
    ),
    # README demo. Its base models (tokenizer, LLM, CLIP) are built once with
    # `python -m dpa_core.toyworld --base-models-only` and shipped in assets/ (about an hour of
    # one CPU core); the world stage then only writes data (seconds).
    "default": WorldSize(
        # 60 px images and 20 px patches: the vision tower's 3x3 patch grid is the scene's 3x3
        # grid of cells, one image token per cell (a 48/12 grid split the cells across patches).
        # The LLM's first 1000 of 4000 steps are first lessons on one-object scenes: without them
        # it never copied a colour or shape out of its context (docs/toyworld.md, "First lessons").
        # At most three objects: the LLM read a four-object scene told in words at 0.48, so the
        # ceiling had no room; with three it reads 0.76 (docs/toyworld.md, "Three objects").
        image_size=60, n_train_images=3000, n_bench_images=600, max_objects=3,
        min_instruct_turns=2, max_instruct_turns=4,
        n_entities=24, n_llm_scene_docs=12000, n_llm_chat_docs=12000, n_llm_fact_docs=6000, n_llm_florid_docs=0,
        verbose_style=1.0, vocab_size=1024,
        llm_hidden=128, llm_layers=4, llm_heads=4, llm_kv_heads=2, llm_intermediate=384,
        llm_max_positions=512, llm_block=256, llm_batch=16, llm_steps=4000, llm_lr=3e-3, llm_first_lessons_steps=1000,
        llm_scene_recap=0.0,
        clip_patch=20, clip_hidden=96, clip_layers=3, clip_heads=4, clip_intermediate=192,
        clip_projection=64, clip_text_max_len=48, clip_batch=128, clip_steps=400, clip_lr=1e-3,
        ppl_texts=200,
    ),
}


def resolve_size(size: str | WorldSize, overrides: Mapping[str, Any] | None = None) -> WorldSize:
    """The named size with individual fields replaced, checked for consistency."""
    if isinstance(size, WorldSize):
        base = size
    elif size in SIZES:
        base = SIZES[size]
    else:
        raise DPAInputError(f"unknown toy world size {size!r}.", fix=f"use one of {sorted(SIZES)}.")
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(WorldSize)}
    for name, value in overrides.items():
        if name not in fields:
            raise DPAInputError(f"unknown toy world setting {name!r}.", fix=f"use one of {sorted(fields)}.")
        want = float if fields[name].type == "float" else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and not isinstance(value, int)):
            raise DPAInputError(f"toy world setting {name!r} must be a {want.__name__}, got {value!r}.")
        overrides[name] = want(value)
    ws = dataclasses.replace(base, **overrides)
    _check(ws)
    return ws


def _check(ws: WorldSize) -> None:
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise DPAInputError(f"inconsistent toy world size: {problem}.")

    for f in dataclasses.fields(ws):
        if f.name == "n_llm_florid_docs":
            need(ws.n_llm_florid_docs >= 0, "n_llm_florid_docs must not be negative")
        elif f.name == "llm_first_lessons_steps":
            need(0 <= ws.llm_first_lessons_steps < ws.llm_steps, "llm_first_lessons_steps must be in 0..llm_steps-1")
        elif f.name in ("verbose_style", "llm_scene_recap"):
            need(0.0 <= getattr(ws, f.name) <= 1.0, f"{f.name} must be in 0..1")
        else:
            need(getattr(ws, f.name) > 0, f"{f.name} must be positive")
    need(1 <= ws.max_objects <= 4, "max_objects must be 1..4")
    need(ws.min_instruct_turns <= ws.max_instruct_turns, "min_instruct_turns > max_instruct_turns")
    need(ws.image_size >= 24, "image_size must be at least 24 pixels")
    need(ws.image_size % ws.clip_patch == 0, "image_size must be a multiple of clip_patch")
    need(ws.llm_hidden % ws.llm_heads == 0, "llm_hidden must be a multiple of llm_heads")
    need(ws.llm_heads % ws.llm_kv_heads == 0, "llm_heads must be a multiple of llm_kv_heads")
    need(ws.clip_hidden % ws.clip_heads == 0, "clip_hidden must be a multiple of clip_heads")
    need(ws.llm_block < ws.llm_max_positions, "llm_block must be below llm_max_positions")
    need(ws.vocab_size >= 300, "vocab_size must be at least 300 (256 bytes + special tokens + merges)")
    need(ws.n_entities >= 4, "n_entities must be at least 4")
