"""One check of the model pair and the data code, run first by every training stage and by
`dpa validate`: everything that would otherwise fail (or silently train the wrong thing) only once
a stage has started, after earlier stages have spent their time.

    LLM family supported            config.json model_type
    vision tower supported          family, image size a multiple of the patch size
    vision config vs its weights    every weight's shape in the safetensors files vs the config
    image token                     present (or addable), one single token, not a token the chat
                                    template or EOS/PAD already use
    data code uses that token       a probe record encoded by the alignment and the chat encodings
                                    carries exactly the vision tower's number of image tokens
    positions                       the LLM holds the image tokens plus text; max_length leaves
                                    room for text after the image tokens

Reads configs, the tokenizer and safetensors headers only: no weights are loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from transformers import AutoModel

from .data import IMAGE_MARKER, Encoder, Record
from .errors import DPAInputError
from .modeling import check_llm_family, load_tokenizer, vision_info

MIN_TEXT_TOKENS = 8  # room the LLM must have for text besides the image tokens


@dataclass
class PreflightReport:
    llm_family: str
    vision_family: str
    image_token: str
    image_token_id: int
    num_image_tokens: int
    max_positions: int | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"models OK ({self.llm_family} LLM, {self.vision_family} vision, {self.num_image_tokens} image tokens "
                f"as {self.image_token!r}, {self.max_positions} positions)")


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def check_vision_weights(vision_path: str | os.PathLike) -> None:
    """The weights on disk have the shapes the vision config asks for (a config edited or copied
    from another checkpoint otherwise fails inside transformers, or loads with random weights)."""
    vision_path = Path(vision_path)
    vcfg = vision_info(vision_path).config
    with torch.device("meta"):
        model = AutoModel._model_mapping[type(vcfg)](vcfg)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    files = _safetensors_files(vision_path)
    if not files:
        return  # .bin checkpoints: transformers checks them on load
    saved: dict[str, tuple] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    saved[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # a truncated or foreign file
            raise DPAInputError(f"cannot read the weights file ({str(e).splitlines()[0][:160]}).", file=f,
                                fix="re-download the vision tower.") from None
    matched = 0
    for name, shape in sorted(expected.items()):
        # a full CLIP/SigLIP checkpoint holds the text tower too: prefer the vision tower's key
        candidates = [k for k in saved if k == name or k.endswith("." + name) or name.endswith("." + k)]
        candidates = [k for k in candidates if "text_model" not in k] or candidates
        if not candidates:
            continue
        key = min(candidates, key=lambda k: (k != name, "vision" not in k, len(k)))
        matched += 1
        if saved[key] != shape:
            raise DPAInputError(
                f"weight {key} has shape {list(saved[key])} but config.json asks for {list(shape)} "
                "(the config does not describe these weights).", file=vision_path / "config.json",
                fix="use the config.json that came with these weights (hidden_size, image_size, patch_size, "
                "layers must match).")
    if not matched:
        raise DPAInputError("no weight of the vision tower was found in its safetensors files.",
                            file=vision_path, fix="point model.vision at a CLIP or SigLIP checkpoint directory.")


def _probe() -> Record:
    return Record("preflight-probe", Path("probe.png"),
                  ((("user", f"{IMAGE_MARKER}\nWhat is in the image?")), ("assistant", "A red circle.")), "preflight")


def preflight(vision: str | os.PathLike, llm: str | os.PathLike, image_token: str = IMAGE_MARKER,
              add_image_token: bool = True, *, multimodal_lengths: Mapping[str, int] | None = None,
              text_lengths: Mapping[str, int] | None = None) -> PreflightReport:
    """Check the model pair and the data code against each other; raise DPAInputError naming the file,
    the key and the fix. `multimodal_lengths` / `text_lengths`: {"align.max_length": 256, ...}."""
    vision, llm = Path(vision), Path(llm)
    text_cfg = check_llm_family(llm)
    info = vision_info(vision)
    check_vision_weights(vision)

    tok = load_tokenizer(llm, image_token, add_image_token)
    token_id = tok.convert_tokens_to_ids(image_token)
    ids = tok(image_token, add_special_tokens=False)["input_ids"]
    if ids != [token_id]:
        raise DPAInputError(f"the image token {image_token!r} is not one token for this tokenizer (encodes as {ids}).",
                            file=llm / "tokenizer_config.json",
                            fix="name a special token in model.image_token, or set model.add_image_token: true.")
    taken = {t for t in (tok.eos_token_id, tok.pad_token_id, getattr(tok, "bos_token_id", None)) if t is not None}
    rendered = ""
    if isinstance(tok.chat_template, str):
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                           tokenize=False)
    if token_id in taken or image_token in rendered:
        raise DPAInputError(f"the image token {image_token!r} is already used by the tokenizer (EOS/PAD/BOS or the "
                            "chat template), so image positions could not be told apart from text.",
                            file=llm / "tokenizer_config.json",
                            fix="name an unused special token in model.image_token (e.g. a reserved/vision pad "
                            "token), or a new one with model.add_image_token: true.")

    n = info.num_image_tokens
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    if max_pos is not None and n + MIN_TEXT_TOKENS > max_pos:
        raise DPAInputError(f"the vision tower gives {n} image tokens but the LLM has only {max_pos} positions "
                            f"(image tokens plus at least {MIN_TEXT_TOKENS} text tokens must fit).",
                            file=llm / "config.json",
                            fix="pair the LLM with a vision tower of fewer patches (smaller image or larger patch).")
    for key, length in (multimodal_lengths or {}).items():
        if length < n + MIN_TEXT_TOKENS:
            raise DPAInputError(f"{key} = {length} leaves no room for text after the {n} image tokens.",
                                file="params.yaml", fix=f"set {key} to at least {n + MIN_TEXT_TOKENS} (it counts the "
                                "image tokens).")
    for key, length in (text_lengths or {}).items():
        if length < 2:
            raise DPAInputError(f"{key} = {length} is too short for any text.", file="params.yaml",
                                fix=f"set {key} to e.g. 128.")

    # The data code, with this token: each encoding of a record with one image carries exactly n
    # image positions (a hard-coded placeholder would give 0 here and crash at step 0 of finetune).
    enc = Encoder(tok, image_token, n, max_length=10 ** 6)
    for name, encode in (("alignment (plain)", enc.plain), ("instruction (chat)", enc.chat)):
        got = int((encode(_probe())["input_ids"] == token_id).sum())
        if got != n:
            raise DPAInputError(f"the {name} encoding puts {got} image tokens in a record with one image, the vision "
                                f"tower gives {n}.", file=llm / "tokenizer_config.json",
                                fix="the image token must be one special token that the chat template passes through "
                                "unchanged; check model.image_token.")
    return PreflightReport(text_cfg.model_type, info.config.model_type, image_token, token_id, n, max_pos)
