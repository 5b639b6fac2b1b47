"""The typed settings of the DPA stages, written once.

The stage functions take these; the pipeline's params.yaml schema (pipelines/params.py) is built
from them and validated by pydantic, so a default or a range check lives here and nowhere else.
They are plain dataclasses (dpa_core does not need pydantic to run): `__pydantic_config__` makes an
unknown key an error when pydantic builds one from a file, and `__post_init__` checks the values on
every construction, direct or through pydantic, raising SettingError with the field's name.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from .errors import SettingError

# pydantic reads this off each class (a ConfigDict is a plain dict): a key not in the schema is an error
FORBID_UNKNOWN_KEYS = {"extra": "forbid"}

Precision = Literal["auto", "fp32", "bf16"]
Smoothing = Literal["flat", "per_sequence"]


def require_positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise SettingError(key, f"must be {'>= 0' if allow_zero else '> 0'} (got {value}).",
                           fix=f"use a {'non-negative' if allow_zero else 'positive'} number.")


@dataclass(frozen=True)
class TrainSettings:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    learning_rate: float = 2e-3
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    global_batch_size: int = 8  # fixed; gradient accumulation derived from processes x per-device batch
    per_device_batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 500  # periodic checkpoints for resume (0: none)
    save_total_limit: int = 2
    logging_steps: int = 1
    gradient_checkpointing: bool = False
    precision: Precision = "auto"  # auto: bf16 on a GPU that has it, else fp32
    dataloader_workers: int = 0
    group_by_modality_length: bool = False  # LLaVA's modality-length-grouped sampler (upstream: on in stage 3)
    connector_learning_rate: Optional[float] = None  # a separate rate for the connector (LLaVA's mm_projector_lr)

    def __post_init__(self) -> None:
        require_positive(self.learning_rate, "learning_rate")
        require_positive(self.global_batch_size, "global_batch_size")
        require_positive(self.per_device_batch_size, "per_device_batch_size")
        if self.max_steps <= 0:
            require_positive(self.epochs, "epochs")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise SettingError("warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio}).",
                               fix="the paper uses 0.03.")
        if self.connector_learning_rate is not None:
            require_positive(self.connector_learning_rate, "connector_learning_rate")


@dataclass(frozen=True)
class LoraSettings:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    r: int = 256
    alpha: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require_positive(self.r, "r")
        require_positive(self.alpha, "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise SettingError("dropout", f"must be in [0, 1) (got {self.dropout}).", fix="use e.g. 0.0 or 0.05.")


FINETUNE_LORA = LoraSettings(r=128, alpha=256, dropout=0.05)  # LLaVA's instruction-tuning LoRA (the paper's stage 3)


@dataclass(frozen=True)
class LossConfig:
    """Which loss a training stage uses. `kind`: vanilla | cmo | cal."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    kind: Literal["vanilla", "cmo", "cal"] = "vanilla"
    delta_min: float = 0.05  # CMO clamp
    delta_max: float = 0.5
    cal_min: float = 1.0  # CAL clamp
    cal_max: float = 5.0
    window: int = 3
    smoothing: Smoothing = "flat"
    image_free: Literal["efficient", "reference"] = "efficient"  # how the image-free pass is run
    # The image-free prediction at image positions (the last one predicts the token after the image):
    # last_text = from the last text token before the image; image_position = the position's own
    # output in the masked pass (upstream). See image_free.py.
    image_boundary: Literal["last_text", "image_position"] = "last_text"
    chunk_tokens: int = 1024  # tokens per chunk when scoring labels against the full vocabulary

    def __post_init__(self) -> None:
        if not -1.0 <= self.delta_min < self.delta_max <= 1.0:
            raise SettingError(None, f"need -1 <= delta_min < delta_max <= 1 (got {self.delta_min}, "
                               f"{self.delta_max}).", fix="paper defaults: 0.05 and 0.5.")
        if not self.cal_min < self.cal_max:
            raise SettingError(None, "need cal_min < cal_max.", fix="paper defaults: 1 and 5.")
        if self.window < 1 or self.window % 2 == 0:
            raise SettingError("window", f"must be an odd number >= 1 (got {self.window}).",
                               fix="use 3 (the paper) or 1 (no smoothing).")
        require_positive(self.chunk_tokens, "chunk_tokens")

    @property
    def clamp(self) -> tuple[float, float]:
        return (self.delta_min, self.delta_max) if self.kind == "cmo" else (self.cal_min, self.cal_max)

    @property
    def needs_image_free_pass(self) -> bool:
        return self.kind in ("cmo", "cal")


@dataclass(frozen=True)
class ModelPaths:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    vision: Path  # CLIP or SigLIP
    llm: Path
    image_token: str = "<image>"
    add_image_token: bool = True  # add the image token to the tokenizer when missing


@dataclass(frozen=True)
class DataSource:
    """A LLaVA-format data file and the directory its image paths are relative to."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    path: Path
    image_root: Optional[Path] = None
    name: str = ""  # names the source in messages


@dataclass(frozen=True)
class CaptionSet:
    """A named held-out caption file (LLaVA format): the name prefixes its reliance metrics."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    name: str
    path: Path
    image_root: Path


@dataclass(frozen=True)
class MixSource:
    """A caption source of the alignment mix: all of it, `count` records, or a `weight` share of the total."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    name: str
    path: Path
    image_root: Path
    weight: float = 1.0
    count: Optional[int] = None

    def __post_init__(self) -> None:
        require_positive(self.weight, "weight", allow_zero=True)
        if self.count is not None:
            require_positive(self.count, "count")


BenchmarkKind = Literal["builtin_tsv", "vlmeval", "lmeval"]


@dataclass(frozen=True)
class BenchmarkSettings:
    """One benchmark of the evaluate stage (see dpa_core/evaluation/benchmark_specs.py for its use)."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    name: str
    kind: BenchmarkKind
    path: Optional[str] = None  # local data file (builtin_tsv, lmeval toy task)
    task: Optional[str] = None  # dataset/task name for vlmeval and lm-eval
    limit: Optional[int] = None  # per-benchmark overrides of the evaluate.* defaults
    batch_size: Optional[int] = None
    max_new_tokens: Optional[int] = None
    prompt: Optional[str] = None  # lmeval local tasks: prompt style (see docs/evaluation.md)
    num_fewshot: Optional[int] = None  # lmeval
    allow_download: Optional[bool] = None  # vlmeval: fetch a missing dataset TSV (needs network)
    # data or extra missing here: skip it (compare averages what every arm has) instead of failing
    optional: bool = False

    def __post_init__(self) -> None:
        kinds = list(typing.get_args(BenchmarkKind))
        if self.kind not in kinds:  # a direct construction (pydantic checks it first when reading a file)
            raise SettingError("kind", f"= {self.kind!r} is not one of {kinds}.", fix=f"use one of {kinds}.")
        if self.kind == "builtin_tsv" and not self.path:
            raise SettingError(None, "a builtin_tsv benchmark needs 'path' (the TSV).", fix="add path: <file>.tsv.")
        if self.kind == "vlmeval" and not self.task:
            raise SettingError(None, "a vlmeval benchmark needs 'task' (VLMEvalKit's dataset name, e.g. "
                               "MMBench_DEV_EN).", fix="add task: <dataset name>; its TSV must be in LMUData.")
        if self.kind == "lmeval" and bool(self.path) == bool(self.task):
            raise SettingError(None, "an lmeval benchmark needs exactly one of 'path' (local jsonl) and 'task' "
                               "(lm-eval name).", fix="set path: <facts.jsonl> or task: <lm-eval task>.")
