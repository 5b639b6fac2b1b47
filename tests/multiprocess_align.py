"""Run the `align` stage (CMO loss, connector only) on tiny models, for the multi-process test.

    python tests/multiprocess_align.py --prepare DATA                 # tiny models + captions, once
    python tests/multiprocess_align.py DATA OUT                       # 1 process
    ACCELERATE_USE_CPU=true accelerate launch \
        --config_file configs/accelerate/cpu_gloo_2proc.yaml tests/multiprocess_align.py DATA OUT

The fixtures are built once, before any launch, so no two workers ever write the same files.
Every rank writes OUT/rank<i>.json: what its Trainer saw (world size, process index) and the
dataset indices it loaded, in order. The main process also writes OUT/result.json (the
stage's per-step history) and the stage output OUT/align/connector.safetensors.
Settings (the same for any number of processes): global batch 4, per-device batch 2, so the
gradient accumulation is 2 with 1 process and 1 with 2; 8 records, 4 steps = 2 epochs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch): make `tests` and `dpa_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_RECORDS = 8
MAX_STEPS = 4
GLOBAL_BATCH = 4
PER_DEVICE_BATCH = 2
CAPTIONS = [
    "a red circle on the left of a blue square",
    "the green triangle is above two yellow circles",
    "a small purple square at the bottom right",
    "two yellow circles",
]


def prepare(root: Path) -> Path:
    """Tiny CLIP + tiny Qwen2 + images + a caption file under `root` (deterministic)."""
    from tests.tiny_models import make_clip, make_images, make_llm

    root = Path(root)
    images = make_images(root / "images")
    make_clip(root / "clip")
    make_llm(root / "llm")
    records = [{"id": f"c{i}", "image": images[i % len(images)],
                "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                  {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]}]}
               for i in range(N_RECORDS)]
    (root / "captions.json").write_text(json.dumps(records))
    return root


def run(data: Path, out: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    import dpa_core.stages as stages
    from dpa_core.losses import LossConfig
    from dpa_core.trainer import TrainSettings

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded: list[int] = []
    seen: dict = {}

    class RecordingDataset(stages.MultimodalDataset):
        def __getitem__(self, i):
            loaded.append(int(i))
            return super().__getitem__(i)

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(world_size=args.world_size, process_index=args.process_index,
                        gradient_accumulation_steps=args.gradient_accumulation_steps,
                        is_world_process_zero=state.is_world_process_zero,
                        distributed=torch.distributed.is_available() and torch.distributed.is_initialized(),
                        backend=(torch.distributed.get_backend()
                                 if torch.distributed.is_available() and torch.distributed.is_initialized() else None),
                        env_world_size=int(os.environ.get("WORLD_SIZE", "1")))

    stages.MultimodalDataset = RecordingDataset  # only to record the indices each rank loads
    settings = TrainSettings(learning_rate=5e-2, max_steps=MAX_STEPS, global_batch_size=GLOBAL_BATCH,
                             per_device_batch_size=PER_DEVICE_BATCH, warmup_ratio=0.0, save_steps=0,
                             logging_steps=1, precision="fp32", seed=0)
    result = stages.align(stages.ModelPaths(data / "clip", data / "llm"),
                          [stages.DataSource(data / "captions.json", data / "images")], out / "align",
                          loss=LossConfig("cmo"), settings=settings, callbacks=[Probe()])
    rank = seen["process_index"]
    (out / f"rank{rank}.json").write_text(json.dumps({**seen, "loaded": loaded}, indent=2))
    if seen["is_world_process_zero"]:
        (out / "result.json").write_text(json.dumps({**seen, "history": result.history}, indent=2))
    return seen


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--prepare":
        prepare(Path(argv[1]))
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
