"""Assemble an MLLM from any HF vision tower and any HF causal LM on transformers' native Llava classes.

The result is a plain `LlavaForConditionalGeneration` + `LlavaProcessor`, so every checkpoint we
write loads with `from_pretrained` in a process that never imports this project.

Assembly reuses the loaded modules instead of copying weights: the Llava shell is built on the
meta device and its vision tower / language model / lm_head are replaced by the pretrained
modules, so a 7B LLM is never held twice in memory. Only the connector is freshly initialised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from .errors import DPAInputError
from .io import atomic_dir

# Decoder-only families whose HF classes follow the `model.embed_tokens ... lm_head` layout that
# Llava wraps. Qwen2.5 reports model_type "qwen2", Llama 3.x "llama".
SUPPORTED_LLM_FAMILIES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "phi3")
# Vision towers and whether they prepend a CLS token (dropped with strategy "default").
SUPPORTED_VISION_FAMILIES = {"clip": True, "clip_vision_model": True, "siglip": False, "siglip_vision_model": False}
VISION_FEATURE_LAYER = -2  # second-to-last layer, as LLaVA
CONNECTOR_FILE = "connector.safetensors"

# Prepended to the LLM's own chat template: turns multimodal content lists
# ([{"type": "image"}, {"type": "text", "text": ...}]) into the plain strings that text-only
# templates expect, with the image as "<image>\n". The LLM keeps its own chat format.
_FLATTEN_CONTENT = (
    "{%- set _flat = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set _flat.msgs = _flat.msgs + [m] -%}"
    "{%- else -%}{%- set _txt = namespace(s='') -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set _txt.s = _txt.s + '@@IMAGE@@\n' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set _txt.s = _txt.s + c['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _flat.msgs = _flat.msgs + [{'role': m['role'], 'content': _txt.s}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = _flat.msgs -%}"
)


@dataclass(frozen=True)
class VisionInfo:
    config: object  # the vision sub-config (CLIPVisionConfig / SiglipVisionConfig)
    has_cls: bool
    num_image_tokens: int


def check_llm_family(llm_path: str | os.PathLike) -> AutoConfig:
    cfg = AutoConfig.from_pretrained(llm_path)
    if cfg.model_type not in SUPPORTED_LLM_FAMILIES:
        raise DPAInputError(
            f"unknown LLM family {cfg.model_type!r}; supported: {', '.join(SUPPORTED_LLM_FAMILIES)}.",
            file=Path(llm_path) / "config.json",
            fix="use a supported decoder-only causal LM, or add its model_type to "
            "dpa_core.modeling.SUPPORTED_LLM_FAMILIES if it has the standard embed_tokens/lm_head layout.",
        )
    return cfg


def vision_info(vision_path: str | os.PathLike) -> VisionInfo:
    cfg = AutoConfig.from_pretrained(vision_path)
    if cfg.model_type not in SUPPORTED_VISION_FAMILIES:
        raise DPAInputError(
            f"unknown vision tower family {cfg.model_type!r}; supported: {', '.join(SUPPORTED_VISION_FAMILIES)}.",
            file=Path(vision_path) / "config.json",
            fix="use a CLIP or SigLIP checkpoint.",
        )
    has_cls = SUPPORTED_VISION_FAMILIES[cfg.model_type]
    vcfg = cfg.vision_config if hasattr(cfg, "vision_config") else cfg
    if vcfg.image_size % vcfg.patch_size:
        raise DPAInputError(
            f"image_size {vcfg.image_size} is not a multiple of patch_size {vcfg.patch_size}.",
            file=Path(vision_path) / "config.json",
            fix="use a vision tower whose image size is divisible by its patch size.",
        )
    n = (vcfg.image_size // vcfg.patch_size) ** 2
    return VisionInfo(vcfg, has_cls, n)


def multimodal_chat_template(tokenizer, image_token: str) -> str:
    template = tokenizer.chat_template
    if not template or not isinstance(template, str):
        raise DPAInputError(
            "the LLM tokenizer has no (single) chat template.",
            file="tokenizer_config.json",
            fix="use an Instruct/chat model, or set tokenizer.chat_template before building.",
        )
    return _FLATTEN_CONTENT.replace("@@IMAGE@@", image_token) + template


def load_tokenizer(llm_path: str | os.PathLike, image_token: str | None = "<image>", add_image_token: bool = True):
    """The LLM tokenizer with the image placeholder as one special token (added if missing;
    `image_token=None` for text-only use)."""
    tok = AutoTokenizer.from_pretrained(llm_path)
    if image_token is not None and image_token not in tok.get_vocab():
        if not add_image_token:
            raise DPAInputError(
                f"the tokenizer lacks the image token {image_token!r}.",
                file=Path(llm_path) / "tokenizer_config.json",
                fix="set model.add_image_token: true (the token is added and the embeddings resized), "
                "or name an existing special token in model.image_token.",
            )
        tok.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@torch.no_grad()
def grow_vocab(lm, size: int) -> None:
    """Resize embeddings for added tokens, new rows set to the mean of the old ones.

    Deterministic on purpose: the finetune and merge stages each rebuild the model, and must
    agree bit for bit on these rows (the image token's embedding is replaced by image features;
    its output row only enters the softmax).
    """
    old = lm.get_input_embeddings().weight.shape[0]
    if old >= size:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    for emb in {id(m.weight): m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None}.values():
        emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)


def build_processor(vision_path, tokenizer, image_token: str = "<image>") -> LlavaProcessor:
    info = vision_info(vision_path)
    return LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(vision_path),
        tokenizer=tokenizer,
        patch_size=info.config.patch_size,
        vision_feature_select_strategy="default" if info.has_cls else "full",
        chat_template=multimodal_chat_template(tokenizer, image_token),
        image_token=image_token,
        num_additional_image_tokens=1 if info.has_cls else 0,
    )


def load_vision_tower(vision_path, dtype=torch.float32):
    """The vision model class Llava itself instantiates (CLIPVisionModel / SiglipVisionModel), so the
    saved Llava checkpoint has the standard key names; from a full CLIP dir it takes the vision half."""
    vcfg = vision_info(vision_path).config
    cls = AutoModel._model_mapping[type(vcfg)]
    return cls.from_pretrained(vision_path, dtype=dtype)


def build_llava(
    vision_path: str | os.PathLike,
    llm_path: str | os.PathLike,
    *,
    connector_path: str | os.PathLike | None = None,
    image_token: str = "<image>",
    add_image_token: bool = True,
    dtype: torch.dtype = torch.float32,
    language_model=None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Vision tower + mlp2x_gelu connector + causal LM as a native Llava model and processor.

    `language_model` may be passed in already loaded (e.g. the proxy: base + merged LoRA);
    otherwise it is loaded from `llm_path`. `connector_path` loads trained connector weights.
    """
    text_cfg = check_llm_family(llm_path)
    info = vision_info(vision_path)
    tokenizer = load_tokenizer(llm_path, image_token, add_image_token)
    processor = build_processor(vision_path, tokenizer, image_token)
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    if max_pos is not None and info.num_image_tokens >= max_pos:
        raise DPAInputError(
            f"the vision tower gives {info.num_image_tokens} image tokens but the LLM has only "
            f"{max_pos} positions.",
            file=Path(llm_path) / "config.json",
            fix="pair the LLM with a vision tower of fewer patches (smaller image or larger patch).",
        )

    lm = language_model if language_model is not None else AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    grow_vocab(lm, len(tokenizer))
    lm_cfg = lm.config
    config = LlavaConfig(
        vision_config=info.config.to_dict() | {"model_type": info.config.model_type},
        text_config=lm_cfg.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        image_seq_length=info.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default" if info.has_cls else "full",
        tie_word_embeddings=bool(getattr(lm_cfg, "tie_word_embeddings", False)),
    )
    config.text_config.vocab_size = lm.get_input_embeddings().weight.shape[0]

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = load_vision_tower(vision_path, dtype=dtype)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    if connector_path is not None:
        load_connector(model, connector_path)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"meta tensors left after assembly: {leftover[:5]}"
    # FSDP's transformer auto-wrap (accelerate, fsdp.yaml) wraps the classes named here and fails on a name
    # absent from the model: CLIPVisionModel inherits CLIP's list, which names CLIPTextEmbeddings.
    present = {type(m).__name__ for m in model.modules()}
    model._no_split_modules = sorted(n for n in (model._no_split_modules or []) if n in present)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def connector_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.model.multi_modal_projector.state_dict().items()}


def _canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes the metadata from a hash
    map, so the same tensors gave different bytes from run to run."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # same length (the padding keeps the data 8-byte aligned)
    return data[:8] + text + data[8 + n:]


def save_connector(model: LlavaForConditionalGeneration, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(_canonical_safetensors(save(connector_state(model), metadata={"format": "pt", "kind": "mlp2x_gelu"})))
    os.replace(tmp, path)
    return path


def load_connector(model: LlavaForConditionalGeneration, path: str | os.PathLike) -> None:
    state = load_file(str(path))
    proj = model.model.multi_modal_projector
    expected = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise DPAInputError(
            f"connector shapes {got} do not fit this vision/LLM pair, which needs {expected}.",
            file=path,
            fix="use the connector trained by the align stage for the same vision tower and LLM.",
        )
    ref = next(proj.parameters())
    proj.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()})


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | os.PathLike) -> Path:
    """Standard HF checkpoint (safetensors + processor), written atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
