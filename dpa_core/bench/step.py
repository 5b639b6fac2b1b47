"""Measurements of one benchmark config: step times of all methods (interleaved), peak memory of one.

Step = forward + backward of the training loss, gradients dropped afterwards (no optimizer).
Timing interleaves the methods step by step (rotating their order) so that a slowly changing
background load on a shared machine falls on all of them alike; it records wall-clock time and
the process's CPU time.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from ..image_free import position_ids_for
from ..losses import LossConfig, vanilla_loss
from ..objective import multimodal_loss
from .batches import make_batch
from .memory import PeakMemory
from .models import build_llava, set_trainable
from .presets import BenchConfig

METHODS = {
    "vanilla": LossConfig("vanilla"),
    "cmo_reference": LossConfig("cmo", image_free="reference"),
    "cmo_efficient": LossConfig("cmo", image_free="efficient"),
    # The textbook path: full [B, S, V] logits, then the mean CE; what `vanilla` improves on.
    "vanilla_full_logits": None,
}


def loss_of(model, batch: dict, method: str) -> torch.Tensor:
    cfg = METHODS[method]
    if cfg is not None:
        return multimodal_loss(model, batch, cfg)
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], position_ids=position_ids_for(batch["attention_mask"]),
                   use_cache=False).logits
    return vanilla_loss(logits, batch["labels"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(config: BenchConfig, device: str, dtype: str):
    dev, dt = torch.device(device), getattr(torch, dtype)
    model = build_llava(config.model, config.image_tokens, dt).to(dev)
    set_trainable(model, config.shape)
    batch = make_batch(config.shape, config.batch, config.text_tokens, config.image_tokens,
                       model.config.vision_config.image_size, config.model.vocab, model.config.image_token_id, dt)
    return model, {k: v.to(dev) for k, v in batch.items()}, dev


def train_step(model, batch: dict, method: str) -> float:
    loss = loss_of(model, batch, method)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def batch_info(config: BenchConfig, batch: dict) -> dict:
    return {"text_positions": int(batch["attention_mask"].sum()) - config.batch * config.image_tokens,
            "target_tokens": int((batch["labels"] != -100).sum()), "sequence_length": batch["input_ids"].shape[1]}


def time_methods(config: BenchConfig, methods: list[str], device: str, dtype: str, steps: int, warmup: int) -> dict:
    """Median wall and CPU seconds per step of each method, after `warmup` rounds."""
    model, batch, dev = prepare(config, device, dtype)
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    loss = {}
    for i in range(warmup + steps):
        for m in methods[i % len(methods):] + methods[: i % len(methods)]:
            sync(dev)
            w0, c0 = time.perf_counter(), time.process_time()
            loss[m] = train_step(model, batch, m)
            sync(dev)
            if i >= warmup:
                wall[m].append(time.perf_counter() - w0)
                cpu[m].append(time.process_time() - c0)
    return {m: {"step_s": statistics.median(wall[m]), "step_s_all": wall[m], "cpu_s": statistics.median(cpu[m]),
                "loss": loss[m], **batch_info(config, batch)} for m in methods}


def peak_memory(config: BenchConfig, method: str, device: str, dtype: str, warmup: int = 1) -> dict:
    """Peak memory over one step of `method` after `warmup` steps (run it in a fresh process)."""
    model, batch, dev = prepare(config, device, dtype)
    for _ in range(warmup):
        train_step(model, batch, method)
    gc.collect()
    with PeakMemory(dev) as mem:
        train_step(model, batch, method)
    return {"peak_bytes": mem.peak, "baseline_bytes": mem.baseline, "step_peak_bytes": mem.peak - mem.baseline,
            "memory_method": mem.method}
