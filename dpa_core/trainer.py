"""The training loop: the HF Trainer with a `compute_loss` override, nothing forked.

The Trainer brings gradient accumulation, cosine schedule with warmup, bf16, gradient
checkpointing, periodic checkpoints and resume, a progress bar, and multi-GPU under
`accelerate launch` with no code change. We add the loss (vanilla / CMO / CAL), CMO weight
statistics in the logs, a global batch size that stays fixed whatever the number of processes,
and a work directory that is resumed only by the same run configuration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.core_model_loading import revert_weight_conversion
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .errors import DPAInputError
from .io import write_json_atomic
from .losses import LossConfig
from .objective import multimodal_loss, text_loss
from .sampling import ModalityLengthGroupedSampler
from .settings import TrainSettings  # noqa: F401  (the training settings, re-exported)

CONNECTOR_PARAM = "multi_modal_projector"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(settings: TrainSettings, processes: int | None = None) -> int:
    processes = processes or world_size()
    per_step = settings.per_device_batch_size * processes
    if settings.global_batch_size % per_step:
        raise DPAInputError(
            f"global_batch_size {settings.global_batch_size} is not a multiple of per_device_batch_size "
            f"{settings.per_device_batch_size} x {processes} processes.",
            fix="choose sizes so that global = per_device x processes x accumulation.")
    return settings.global_batch_size // per_step


def use_bf16(settings: TrainSettings) -> bool:
    if settings.precision == "fp32":
        return False
    has = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if settings.precision == "bf16" and not has:
        raise DPAInputError("precision bf16 asked for, but no GPU with bf16 is available.",
                            fix="set train precision: auto (fp32 on CPU).")
    return has


def training_arguments(settings: TrainSettings, work_dir: Path) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(settings),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        full_determinism=not cuda,  # deterministic on CPU; GPU kernels stay fast
        bf16=use_bf16(settings),
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if settings.save_steps > 0 else "no",
        save_steps=max(settings.save_steps, 1),
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        report_to="none",  # tracking is the pipeline's job (MLflow callback)
        remove_unused_columns=False,
        dataloader_num_workers=settings.dataloader_workers,
        use_cpu=not cuda,
        disable_tqdm=False,
    )


def load_checkpoint_weights(model, checkpoint: str | os.PathLike) -> None:
    """Load the weights of a Trainer checkpoint (written by `save_pretrained`) into `model`, in place.

    transformers 5 saves some models (Llava among them) under their original checkpoint key names
    (`language_model.model...`, `multi_modal_projector...`) while the module names are
    `model.language_model...`; the Trainer's own resume loads the file with a non-strict
    `load_state_dict` that then matches no key at all and silently keeps the initial weights.
    Here the saved names are mapped back to the module's, and a missing weight is an error.
    """
    checkpoint = Path(checkpoint)
    own = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, t in own.items():
        names_of[id(t)].append(name)
    saved_to_own = {saved: names_of[id(t)] for saved, t in revert_weight_conversion(model, dict(own)).items()
                    if id(t) in names_of}
    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for f in files:
        for key, value in load_file(str(checkpoint / f)).items():
            for name in saved_to_own.get(key, [key]):
                state[name] = value
    missing = sorted(set(own) - set(state))
    if missing:
        raise RuntimeError(f"checkpoint {checkpoint} lacks weights of the model: {missing[:5]} "
                           f"({len(missing)} in all); delete the work directory to start over.")
    model.load_state_dict(state, strict=False)


class DPATrainer(Trainer):
    """Trainer whose loss is vanilla, CMO or CAL (multimodal batches) or plain CE (text batches)."""

    def __init__(self, *args, loss_config: LossConfig | None = None, multimodal: bool = True,
                 group_by_modality_length: bool = False, connector_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or LossConfig()
        self.multimodal = multimodal
        self.group_by_modality_length = group_by_modality_length
        self.connector_learning_rate = connector_learning_rate
        # Our losses are per-micro-batch means, so the Trainer divides by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._stat_sums: dict[str, float] = defaultdict(float)
        self._stat_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.multimodal:
            return text_loss(model, inputs)
        loss, stats = multimodal_loss(model, inputs, self.loss_config, return_stats=True)
        if stats:
            for k, v in stats.items():
                self._stat_sums[k] += v
            self._stat_count += 1
        return loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        if not hasattr(dataset, "modality_lengths"):
            raise DPAInputError("group_by_modality_length needs a multimodal dataset (records with word counts).",
                                fix="set group_by_modality_length: false for this stage.")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(dataset.modality_lengths, self.args.per_device_train_batch_size,
                                            self.args.world_size * self.args.gradient_accumulation_steps, seed)

    def create_optimizer(self, model=None):
        # LLaVA's create_optimizer with mm_projector_lr: the connector's parameters in groups of their own.
        if self.connector_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups.setdefault((CONNECTOR_PARAM in name, name in decay), []).append(p)
        if not any(connector for connector, _ in groups):
            raise DPAInputError("connector_learning_rate is set but no trainable connector parameter was found.",
                                fix="unset connector_learning_rate, or train the connector in this stage.")
        grouped = [{"params": ps, "weight_decay": self.args.weight_decay if dec else 0.0,
                    **({"lr": self.connector_learning_rate} if connector else {})}
                   for (connector, dec), ps in sorted(groups.items())]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = cls(grouped, **kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        plain = not hasattr(target, "peft_config") and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
        if plain and Path(resume_from_checkpoint, "config.json").is_file():
            return load_checkpoint_weights(target, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then a completion marker written last, then the rotation.

        A kill while saving leaves a checkpoint without the marker; `last_complete_checkpoint`
        skips it. Rotation (deleting older checkpoints) runs only once the new one is complete,
        so a complete checkpoint always remains to fall back to.
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # every rank's shard is on disk before the marker
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            mark_complete(folder, self.state.global_step)
            rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._stat_count and "loss" in logs:
            prefix = self.loss_config.kind
            logs.update({f"{prefix}/{k}": v / self._stat_count for k, v in self._stat_sums.items()})
            self._stat_sums.clear()
            self._stat_count = 0
        super().log(logs, *args, **kwargs)


class StageProgress(TrainerCallback):
    """One progress bar per training run with the latest loss (and learning rate) in its postfix.

    Replaces the Trainer's ProgressCallback, which also prints every logged dict under the bar:
    those records go to the stage's history.json and to MLflow, not to the terminal."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            post = {"loss": f"{logs['loss']:.4f}"}
            if "learning_rate" in logs:
                post["lr"] = f"{logs['learning_rate']:.1e}"
            self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


COMPLETE_MARKER = "dpa_checkpoint_complete.json"
FINGERPRINT_FILE = "run_fingerprint.json"
# Wall-clock figures: they go to MLflow and to a separate untracked file, never into an output
# that DVC hashes (a rerun with identical weights must give identical bytes).
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def _say(msg: str) -> None:
    print(f"[dpa] {msg}", flush=True)


def mark_complete(checkpoint: Path, step: int) -> None:
    """Record every file of `checkpoint` with its size, as the last write of the checkpoint."""
    files = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*"))
             if f.is_file() and f.name != COMPLETE_MARKER}
    write_json_atomic(checkpoint / COMPLETE_MARKER, {"step": step, "files": files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (None: it is complete)."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return "no completion marker (killed while saving?)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable completion marker"
    for rel, size in files.items():
        f = checkpoint / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    return None


def last_complete_checkpoint(work_dir: Path) -> str | None:
    """The newest complete checkpoint; incomplete ones are reported and deleted."""
    found = []
    for d in Path(work_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return str(d)
        _say(f"skipping incomplete checkpoint {d}: {problem}; deleted.")
        shutil.rmtree(d, ignore_errors=True)
    return None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def prepare_work_dir(work_dir: Path, fingerprint: dict) -> str | None:
    """Resume from `work_dir`'s last complete checkpoint only if it was made from the same inputs.

    `fingerprint` holds the effective settings and the content hashes of the input artifacts; a
    work dir made with another one is deleted, with one line naming what changed.
    """
    work_dir = Path(work_dir)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    stamp = work_dir / FINGERPRINT_FILE
    if work_dir.exists():
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            why = ("no readable fingerprint" if old is None
                   else "made with other inputs or settings (changed: " + ", ".join(_changed_keys(old, fingerprint)[:8]) + ")")
            if any(work_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
                _say(f"discarding the checkpoints in {work_dir}: {why}.")
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        write_json_atomic(stamp, fingerprint)
    return last_complete_checkpoint(work_dir)


def _final_state(checkpoint: str) -> TrainerState | None:
    """The checkpoint's trainer state if it is the run's last step (nothing left to train)."""
    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def _history(log_history: list[dict]) -> list[dict]:
    """The per-step records of the whole run (the Trainer keeps them in every checkpoint, so a
    resumed run has the steps before the interruption too), without wall-clock figures."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in log_history]


def _train_loss(history: list[dict]) -> float | None:
    """Mean training loss over every step of the run, resumed or not (each logged loss is the mean
    over the steps since the previous log)."""
    prev, total, last = 0, 0.0, 0
    for r in history:
        if "loss" in r and "step" in r:
            total += r["loss"] * (r["step"] - prev)
            prev = last = r["step"]
    return total / last if last else None


def train(model, dataset, collator, settings: TrainSettings, work_dir: Path, *, loss_config: LossConfig | None = None,
          multimodal: bool = True, callbacks: Sequence[TrainerCallback] = (), fingerprint: dict | None = None) -> dict:
    """Train `model` in place; returns {"history": [...], "train": final metrics}. Resumes after a crash."""
    work_dir = Path(work_dir)
    fp = {"settings": asdict(settings), "loss": asdict(loss_config) if loss_config else None, **(fingerprint or {})}
    args = training_arguments(settings, work_dir)
    # Under `accelerate launch` every rank runs this: the main process alone deletes a stale work
    # dir, the others wait (a barrier) and then only read it; concurrent rmtree's crashed.
    with args.main_process_first(local=False, desc="preparing the work dir"):
        resume = prepare_work_dir(work_dir, fp)
    trainer = DPATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        loss_config=loss_config,
        multimodal=multimodal,
        group_by_modality_length=settings.group_by_modality_length,
        connector_learning_rate=settings.connector_learning_rate,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(ProgressCallback)  # prints every log dict; StageProgress does not
    trainer.add_callback(StageProgress(f"{work_dir.parent.name}/{work_dir.name.removesuffix('.work')}"))
    final = _final_state(resume) if resume and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled) else None
    if final is not None:
        # The run had finished training when it was killed (e.g. while writing its output). The
        # Trainer would resume and run one step more than max_steps; the checkpoint is the result.
        _say(f"{resume} holds the last step of this run: its weights are the result, no step is run")
        trainer._load_from_checkpoint(resume)
        history = _history(final.log_history) + [
            {"epoch": final.epoch, "step": final.global_step, "total_flos": final.total_flos, "train_loss": None}]
        metrics = {"epoch": final.epoch, "total_flos": final.total_flos}
    else:
        if resume:
            _say(f"resuming from {resume}")
        result = trainer.train(resume_from_checkpoint=resume)
        history = _history(trainer.state.log_history)
        metrics = {k: v for k, v in result.metrics.items() if k not in TIMING_KEYS}
    mean_loss = _train_loss(history)
    if mean_loss is not None:
        # the Trainer's own figure averages the steps of this process only (after a resume: the
        # resumed ones); the history's final record and the metrics get the whole run's
        metrics["train_loss"] = mean_loss
        for r in history:
            if "train_loss" in r:
                r["train_loss"] = mean_loss
    history = [{k: v for k, v in r.items() if v is not None or k != "train_loss"} for r in history]
    timings = {k: v for k, v in result.metrics.items() if k in TIMING_KEYS} if final is None else {}
    return {"history": history, "train": metrics, "timings": timings,
            "resumed_from": resume, "world_size": trainer.args.world_size,
            "is_main_process": trainer.is_world_process_zero()}
