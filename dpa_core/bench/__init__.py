"""Benchmarks. `python -m dpa_core.bench.cmo` measures vanilla vs CMO (reference / efficient) step time
and peak memory on random-initialised Qwen2 + CLIP shaped models (no downloads)."""
