"""The four training stages of DPA, each one function: typed inputs in, an output directory out.

    proxy_pretrain  LoRA on the target LLM over caption text only (PMO)          -> adapter
    align           connector only, against the LLM (+ merged proxy adapter)   -> connector
    finetune        connector + LLM (LoRA or full), original LLM, chat data     -> adapter or model
    merge           fold the LoRA into the LLM                                  -> standalone Llava dir

Method arms are two switches: `proxy` (align against the proxy LLM) and the loss kind
(vanilla | cmo | cal). No orchestration here: the pipelines call these functions.
Every output directory is written atomically (see io.atomic_dir); resumable checkpoints live in
a separate work directory next to it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed

from .data import (AspectRatio, Collator, Encoder, MultimodalDataset, SequenceEnd, TextDataset, load_llava_records,
                   load_text_records)
from .errors import DPAInputError
from .io import atomic_dir, content_digest, stat_digest, write_json_atomic
from .modeling import build_llava, load_tokenizer, save_connector, save_llava, vision_info, CONNECTOR_FILE
from .settings import FINETUNE_LORA, DataSource, LoraSettings, LossConfig, ModelPaths, TrainSettings
from .trainer import train, use_bf16

# Linear layers of the decoder blocks across supported families (phi3 fuses qkv and gate/up).
LLM_LINEAR = r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)"


@dataclass
class StageResult:
    out_dir: Path
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # wall-clock figures, kept out of the output dir


def _dtype(settings: TrainSettings) -> torch.dtype:
    return torch.bfloat16 if use_bf16(settings) else torch.float32


def _work_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.work")


def _model_inputs(paths: ModelPaths) -> dict:
    """Content hashes of the model directories (resume fingerprints: a checkpoint is resumed only
    when it was trained from the same bytes, not merely the same paths)."""
    return {"vision": content_digest(paths.vision), "llm": content_digest(paths.llm)}


def _data_inputs(sources: Sequence[DataSource], records) -> dict:
    return {"files": [content_digest(s.path) for s in sources],
            "images": stat_digest(sorted({str(r.image) for r in records if r.image is not None}))}


def _finish(out_dir: Path, run: dict, extra: dict, write) -> StageResult:
    """Write the stage's output atomically (main process only) and drop the work dir."""
    metrics = {**extra, **{f"train/{k}": v for k, v in run["train"].items() if isinstance(v, (int, float))}}
    if run["is_main_process"]:
        with atomic_dir(out_dir) as tmp:
            write(tmp)
            write_json_atomic(tmp / "metrics.json", metrics)
            write_json_atomic(tmp / "history.json", run["history"])
            for cfg in tmp.rglob("adapter_config.json"):
                sort_adapter_config(cfg)
        shutil.rmtree(_work_dir(out_dir), ignore_errors=True)
    return StageResult(Path(out_dir), metrics, run["history"], run.get("timings", {}))


def sort_adapter_config(path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that changes from run to run; sorted,
    the same adapter gives the same bytes (and DVC does not rerun what depends on it)."""
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    write_json_atomic(path, cfg)


def _seed(settings: TrainSettings) -> None:
    # Before any weight is initialised (the fresh connector, LoRA's A matrices): the Trainer seeds only
    # once the model exists, so without this two runs of one configuration (or a resumed run and an
    # uninterrupted one) would start from different random weights.
    set_seed(settings.seed)


def _freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _upcast_trainable(model: torch.nn.Module) -> None:
    # Trainable weights stay fp32 (master weights) even when the frozen ones are bf16.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def load_records(sources: Sequence[DataSource], *, require_image: bool = True, image_token: str = "<image>"):
    # Alignment needs an image in every record; instruction data may mix in text-only records (LLaVA-665K
    # has 40k), whose CMO/CAL weight is that of a sequence without image tokens: the image-free pass equals
    # the main one, delta = 0, the weight sits at the lower bound (as upstream; see docs/fidelity.md).
    return [r for s in sources for r in load_llava_records(s.path, s.image_root, require_image=require_image,
                                                           image_token=image_token)]


def _preflight(paths: ModelPaths, max_length: int) -> None:
    from .preflight import preflight

    preflight(paths.vision, paths.llm, paths.image_token, paths.add_image_token,
              multimodal_lengths={"max_length": max_length})


def load_proxy_llm(llm: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32):
    """The proxy LLM: the target LLM with the proxy LoRA merged in."""
    base = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def proxy_pretrain(llm: Path, text_corpus: Path, out_dir: Path, *, lora: LoraSettings, settings: TrainSettings,
                   max_length: int = 512, sequence_end: SequenceEnd = "eos",
                   callbacks: Sequence[TrainerCallback] = ()) -> StageResult:
    """PMO: adapt a copy of the LLM to the caption corpus's language, text only, with LoRA."""
    out_dir = Path(out_dir)
    texts = load_text_records(text_corpus)
    _seed(settings)
    tok = load_tokenizer(llm, image_token=None)
    model = AutoModelForCausalLM.from_pretrained(llm, dtype=_dtype(settings))
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    _upcast_trainable(model)
    run = train(model, TextDataset(texts, Encoder(tok, max_length=max_length, sequence_end=sequence_end)),
                Collator(tok.pad_token_id), settings, _work_dir(out_dir), multimodal=False, callbacks=callbacks,
                fingerprint={"stage": "proxy", "lora": asdict(lora), "max_length": max_length,
                             "sequence_end": sequence_end,
                             "inputs": {"llm": content_digest(llm), "corpus": content_digest(text_corpus)}})
    extra = {"n_texts": len(texts), "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return _finish(out_dir, run, extra, lambda tmp: model.save_pretrained(tmp))


def align(paths: ModelPaths, captions: Sequence[DataSource], out_dir: Path, *, loss: LossConfig,
          settings: TrainSettings, proxy_adapter: Path | None = None, max_length: int = 2048,
          image_aspect_ratio: AspectRatio = "crop", sequence_end: SequenceEnd = "eos",
          callbacks: Sequence[TrainerCallback] = ()) -> StageResult:
    """Train the connector only; the LLM (proxy if given) and the vision tower stay frozen."""
    out_dir = Path(out_dir)
    _preflight(paths, max_length)
    records = load_records(captions, image_token=paths.image_token)
    _seed(settings)
    dtype = _dtype(settings)
    lm = load_proxy_llm(paths.llm, Path(proxy_adapter), dtype) if proxy_adapter else None
    model, processor = build_llava(paths.vision, paths.llm, language_model=lm, image_token=paths.image_token,
                                   add_image_token=paths.add_image_token, dtype=dtype)
    _freeze(model)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    _upcast_trainable(model)
    enc = Encoder(processor.tokenizer, paths.image_token, vision_info(paths.vision).num_image_tokens, max_length,
                  sequence_end=sequence_end)
    run = train(model, MultimodalDataset(records, enc.plain, processor.image_processor, image_aspect_ratio),
                Collator(processor.tokenizer.pad_token_id), settings, _work_dir(out_dir), loss_config=loss,
                callbacks=callbacks,
                fingerprint={"stage": "align", "image_token": paths.image_token, "max_length": max_length,
                             "add_image_token": paths.add_image_token, "proxy": proxy_adapter is not None,
                             "image_aspect_ratio": image_aspect_ratio, "sequence_end": sequence_end,
                             "inputs": {**_model_inputs(paths), "captions": _data_inputs(captions, records),
                                        "proxy_adapter": content_digest(proxy_adapter)}})
    return _finish(out_dir, run, {"n_records": len(records), "proxy": proxy_adapter is not None},
                   lambda tmp: save_connector(model, tmp / CONNECTOR_FILE))


def untrained_connector(paths: ModelPaths, out_dir: Path, *, seed: int) -> StageResult:
    """The control for alignment: the connector an aligned arm starts from (seeded as `align` seeds
    it, before the model is built), saved untrained. An arm that finetunes from it skips LLaVA's
    stage 1; if it scores as well as an aligned arm, that arm's alignment brings nothing measurable
    in the study (and DPA's proxy acts through alignment)."""
    out_dir = Path(out_dir)
    set_seed(seed)
    model, _ = build_llava(paths.vision, paths.llm, image_token=paths.image_token,
                           add_image_token=paths.add_image_token)
    metrics = {"trained": 0}
    with atomic_dir(out_dir) as tmp:
        save_connector(model, tmp / CONNECTOR_FILE)
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "history.json", [])
    return StageResult(out_dir, metrics)


def finetune(paths: ModelPaths, connector: Path, instructions: Sequence[DataSource], out_dir: Path, *,
             loss: LossConfig, settings: TrainSettings, tune: Literal["lora", "full"] = "lora",
             lora: LoraSettings | None = None, max_length: int = 2048, image_aspect_ratio: AspectRatio = "crop",
             image_first: bool = False, system_prompt: str | None = None,
             callbacks: Sequence[TrainerCallback] = ()) -> StageResult:
    """Instruction tuning of the original LLM with the learned connector; loss on answers only.
    Text-only records are accepted (see `load_records`).

    Writes `adapter/` (LoRA on the LLM + the connector as a saved module) when tune == "lora",
    else `model/` (a full Llava checkpoint). The vision tower stays frozen.
    """
    out_dir = Path(out_dir)
    _preflight(paths, max_length)
    records = load_records(instructions, require_image=False, image_token=paths.image_token)
    _seed(settings)
    model, processor = build_llava(paths.vision, paths.llm, connector_path=connector, image_token=paths.image_token,
                                   add_image_token=paths.add_image_token, dtype=_dtype(settings))
    _freeze(model.model.vision_tower)
    if tune == "lora":
        lora = lora or FINETUNE_LORA
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=rf"model\.language_model\..*\.{LLM_LINEAR}",
            modules_to_save=["multi_modal_projector"]))
    elif tune != "full":
        raise DPAInputError(f"unknown finetune mode {tune!r}.", fix="use tune: lora or tune: full.")
    _upcast_trainable(model)
    enc = Encoder(processor.tokenizer, paths.image_token, vision_info(paths.vision).num_image_tokens, max_length,
                  image_first=image_first, system_prompt=system_prompt)
    run = train(model, MultimodalDataset(records, enc.chat, processor.image_processor, image_aspect_ratio),
                Collator(processor.tokenizer.pad_token_id), settings, _work_dir(out_dir), loss_config=loss,
                callbacks=callbacks,
                fingerprint={"stage": "finetune", "image_token": paths.image_token, "max_length": max_length,
                             "add_image_token": paths.add_image_token, "tune": tune,
                             "lora": asdict(lora) if lora else None, "image_aspect_ratio": image_aspect_ratio,
                             "image_first": image_first, "system_prompt": system_prompt,
                             "inputs": {**_model_inputs(paths), "connector": content_digest(connector),
                                        "instructions": _data_inputs(instructions, records)}})

    def write(tmp: Path) -> None:
        if tune == "lora":
            model.save_pretrained(tmp / "adapter")
        else:
            model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / ("adapter" if tune == "lora" else "model"))

    return _finish(out_dir, run, {"n_records": len(records), "tune": tune}, write)


def merge(paths: ModelPaths, finetuned: Path, out_dir: Path) -> StageResult:
    """One standalone Llava checkpoint: base + LoRA folded in (or the fully tuned model, copied)."""
    finetuned, out_dir = Path(finetuned), Path(out_dir)
    if (finetuned / "model").is_dir():
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(finetuned / "model", tmp, dirs_exist_ok=True)
        return StageResult(out_dir, {"merged": False})
    adapter = finetuned / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise DPAInputError("no finetune output here (neither adapter/ nor model/).", file=finetuned,
                            fix="run the finetune stage first.")
    model, processor = build_llava(paths.vision, paths.llm, image_token=paths.image_token,
                                   add_image_token=paths.add_image_token)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save_llava(model, processor, out_dir)
    return StageResult(out_dir, {"merged": True})
