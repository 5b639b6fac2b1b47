"""Cut the language model out of a Llava checkpoint: a standalone causal-LM directory
(e.g. Qwen2ForCausalLM) with the LLM's config, weights and the tokenizer, for text-only evaluation.

Reads the safetensors directly and keeps only the LLM's tensors, so a 7B checkpoint is never loaded
twice and the vision tower is never loaded. Both key layouts transformers writes are handled:
  language_model.model.* / language_model.lm_head.*   (what transformers 5 saves, the classic layout)
  model.language_model.* / lm_head.*                   (the in-memory layout of transformers >= 4.52)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import DPAInputError
from ..io import atomic_dir

# (prefix in the Llava checkpoint, prefix in the causal LM)
_KEY_MAPS = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
_NON_LLM_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _safetensors_files(llava_dir: Path) -> list[Path]:
    index = llava_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [llava_dir / s for s in shards]
    single = llava_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise DPAInputError("no model.safetensors (or sharded index) found.", file=llava_dir,
                        fix="save the Llava checkpoint with save_pretrained(safe_serialization=True).")


def _llm_key(key: str) -> str | None:
    for src, dst in _KEY_MAPS:
        if key.startswith(src):
            return dst + key[len(src):]
    if key.startswith(_NON_LLM_PREFIXES):
        return None
    raise DPAInputError(f"unexpected weight {key!r} in a Llava checkpoint.", record=key,
                        fix="extract from a LlavaForConditionalGeneration checkpoint.")


def language_model_state(llava_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = {}
    for path in _safetensors_files(Path(llava_dir)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if (new := _llm_key(key)) is not None:
                    state[new] = f.get_tensor(key)
    return state


def is_llava_dir(model_dir: str | os.PathLike) -> bool:
    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_language_model(llava_dir: str | os.PathLike, dtype: torch.dtype | None = None):
    """The Llava checkpoint's LLM as a standalone causal LM in memory (e.g. Qwen2ForCausalLM), built
    from the checkpoint's text config and its LLM tensors only (the vision tower is never read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    llava_dir = Path(llava_dir)
    if not is_llava_dir(llava_dir):
        raise DPAInputError("not a Llava checkpoint (config.json model_type is not 'llava').", file=llava_dir,
                            fix="pass the merged Llava directory; a plain LLM directory can be evaluated directly.")
    text_config = AutoConfig.from_pretrained(llava_dir).text_config
    state = language_model_state(llava_dir)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    from transformers.initialization import no_init_weights

    # Real (uninitialised) CPU tensors, not the meta device: computed buffers (rotary inv_freq)
    # get their values from the constructor; the weights are then assigned from the checkpoint.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(text_config, dtype=next(iter(state.values())).dtype)
    text_config.architectures = [type(model).__name__]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise DPAInputError(
            f"the LLM weights do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}.",
            file=llava_dir, fix="check that the checkpoint was written by save_pretrained from a Llava model.")
    if tied:
        model.tie_weights()
    model.config.dtype = next(iter(state.values())).dtype
    return model.eval()


def extract_language_model(llava_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Llava checkpoint's LLM as a standalone causal LM (config, weights, tokenizer)."""
    from transformers import AutoTokenizer, GenerationConfig

    llava_dir = Path(llava_dir)
    model = load_language_model(llava_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(llava_dir).save_pretrained(tmp)
        if (llava_dir / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(llava_dir).save_pretrained(tmp)
    return Path(out_dir)
