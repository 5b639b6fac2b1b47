"""Smoke test for an accelerate config: one all_reduce and one DDP step across all ranks.

    accelerate launch --config_file configs/accelerate/ddp.yaml configs/accelerate/allreduce_check.py
    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/cpu_gloo_2proc.yaml \
        configs/accelerate/allreduce_check.py

Each rank prints one line ``allreduce_check rank=R world=W ...`` and exits non-zero when the
all_reduce sum or the DDP-averaged gradient is wrong, or when accelerate's world size is not
the launcher's WORLD_SIZE (the processes did not really form one process group).
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator


def main() -> int:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes

    # Collective: sum of (rank + 1) over ranks == W (W + 1) / 2.
    value = torch.tensor([float(rank + 1)], device=accelerator.device)
    total = accelerator.reduce(value, reduction="sum").item()
    expected_total = world * (world + 1) / 2

    # DDP: each rank's gradient is rank + 1; after backward every rank holds the mean.
    model = accelerator.prepare(torch.nn.Linear(1, 1, bias=False))
    loss = model(torch.full((1, 1), float(rank + 1), device=accelerator.device)).sum()
    accelerator.backward(loss)
    grad = model.module.weight.grad if hasattr(model, "module") else model.weight.grad
    mean_grad = grad.item()
    expected_grad = expected_total / world

    # torchrun exports WORLD_SIZE; a worker that did not join the group sees world == 1.
    launched = int(os.environ.get("WORLD_SIZE", world))
    ok = world == launched and total == expected_total and abs(mean_grad - expected_grad) < 1e-6
    print(
        f"allreduce_check rank={rank} world={world} type={accelerator.distributed_type.value}"
        f" backend={accelerator.state.backend} device={accelerator.device}"
        f" sum={total:g} grad={mean_grad:g} {'OK' if ok else 'MISMATCH'}",
        flush=True,
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
