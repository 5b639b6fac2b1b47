"""The benchmark's configurations: smoke (seconds, for the test), cpu (a 2-core CPU in minutes), gpu (real shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import QWEN2_05B_CLIP_L, ModelShape

VOCAB_QWEN2 = 151936


@dataclass(frozen=True)
class BenchConfig:
    name: str
    shape: str  # alignment (connector trainable) | instruction (connector + LLM trainable)
    model: ModelShape
    image_tokens: int
    text_tokens: int  # text tokens of the longest sequence; the others are shorter (padding)
    batch: int


@dataclass(frozen=True)
class Preset:
    configs: list[BenchConfig]
    dtype: str
    steps: int
    warmup: int
    isolate: bool  # one fresh process per (config, method), for honest peak-memory figures
    note: str = ""
    threads: int | None = None  # torch CPU threads (None: torch's default)
    methods: tuple[str, ...] = field(default=("vanilla", "cmo_reference", "cmo_efficient"))


TINY = ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=512,
                  vision_hidden=32, vision_layers=2, vision_heads=2)

# CPU: Qwen2-0.5B's depth (24 layers, MLP 5.4x hidden) at width 128 / 256, with its token counts.
# Qwen2-0.5B has 2.6x more parameters in its layers than in its LM head; at a 32k vocabulary the
# narrow and wider CPU models bracket that (1.9x, 3.7x), so their time ratios are the ones to read.
# At 152k and width 128 the LM head is 2.5x the layers (vocabulary-dominated, unlike any real
# model): those configs are there for the memory target.
CPU_NARROW = ModelShape(hidden=128, layers=24, heads=2, kv_heads=1, intermediate=704, vocab=32000,
                        vision_hidden=128, vision_layers=4, vision_heads=2)
CPU_WIDER = ModelShape(hidden=256, layers=24, heads=4, kv_heads=2, intermediate=1392, vocab=32000,
                       vision_hidden=128, vision_layers=4, vision_heads=2)
CPU_NARROW_152K = ModelShape(**{**CPU_NARROW.__dict__, "vocab": VOCAB_QWEN2})

PRESETS = {
    "smoke": Preset(
        configs=[
            BenchConfig("align-tiny", "alignment", TINY, image_tokens=16, text_tokens=8, batch=2),
            BenchConfig("instr-tiny", "instruction", TINY, image_tokens=16, text_tokens=40, batch=2),
        ],
        dtype="float32", steps=2, warmup=1, isolate=False, threads=1, note="tiny shapes; timings meaningless"),
    "cpu": Preset(
        configs=[
            BenchConfig("align-w128-v32k", "alignment", CPU_NARROW, 576, 128, 2),
            BenchConfig("align-w256-v32k", "alignment", CPU_WIDER, 576, 128, 2),
            BenchConfig("align-w128-v32k-img144", "alignment", CPU_NARROW, 144, 128, 2),
            BenchConfig("align-w128-v32k-txt32", "alignment", CPU_NARROW, 576, 32, 2),
            BenchConfig("align-w128-v152k", "alignment", CPU_NARROW_152K, 576, 128, 2),
            BenchConfig("instr-w128-v32k", "instruction", CPU_NARROW, 576, 1024, 1),
            BenchConfig("instr-w128-v152k", "instruction", CPU_NARROW_152K, 576, 1024, 1),
        ],
        dtype="float32", steps=3, warmup=1, isolate=True, threads=1,
        methods=("vanilla", "cmo_reference", "cmo_efficient", "vanilla_full_logits"),
        note="one CPU thread, so that process CPU time stays a fair measure when other processes share the "
             "cores; width scaled down from Qwen2-0.5B (896) to fit a 2-core CPU; token counts and the 152k "
             "vocabulary kept"),
    "gpu": Preset(
        configs=[
            BenchConfig("align-qwen2-0.5b", "alignment", QWEN2_05B_CLIP_L, 576, 128, 16),
            BenchConfig("instr-qwen2-0.5b", "instruction", QWEN2_05B_CLIP_L, 576, 1024, 4),
        ],
        dtype="bfloat16", steps=10, warmup=3, isolate=True,
        note="Qwen2-0.5B-shaped LLM (random init) + CLIP ViT-L/14-336-shaped tower, bf16"),
}
