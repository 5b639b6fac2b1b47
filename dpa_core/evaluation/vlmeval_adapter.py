"""Our Llava checkpoints as a VLMEvalKit model (a `vlmeval.vlm.base.BaseModel`).

Importing this module imports VLMEvalKit (see vlmeval_import). The adapter:
  * builds LLaVA's multiple-choice prompt itself (use_custom_prompt/build_prompt, the same text as
    the built-in scorer's, from generation.mcq_prompt) and leaves every other dataset type to the
    dataset's own prompt, as VLMEvalKit's LLaVA adapter does;
  * answers greedily with LlavaGenerator; `generate_batch` answers many messages at once (our runner
    uses it), `generate_inner` one (VLMEvalKit's own inference loop, `infer_data_job`, uses it).
"""

from __future__ import annotations

import os

import pandas as pd
from PIL import Image

from .generation import GenerationRequest, LlavaGenerator, mcq_prompt
from .vlmeval_import import import_vlmeval

import_vlmeval()
from vlmeval.dataset import DATASET_TYPE  # noqa: E402 - needs import_vlmeval() first
from vlmeval.vlm.base import BaseModel  # noqa: E402

MODEL_NAME = "DPALlava"


def _load_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def message_to_request(message: list[dict]) -> GenerationRequest:
    """VLMEvalKit message ([{'type': 'image'|'text', 'value': ...}]) -> one user turn: images first
    (LLaVA places the image before the text), texts joined by newlines."""
    texts = [m["value"] for m in message if m["type"] == "text"]
    paths = tuple(m["value"] for m in message if m["type"] == "image")
    return GenerationRequest("\n".join(texts), load_images=lambda: [_load_image(p) for p in paths])


class DPALlavaVLM(BaseModel):
    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", max_new_tokens: int = 16,
                 generator: LlavaGenerator | None = None):
        super().__init__()
        self.generator = generator if generator is not None else LlavaGenerator(model_dir, device=device)
        self.max_new_tokens = max_new_tokens

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return dataset is not None and DATASET_TYPE(dataset) == "MCQ"

    def build_prompt(self, line, dataset: str | None = None) -> list[dict]:
        paths = self.dump_image(line, dataset)
        options = {c: str(line[c]) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in line and not pd.isna(line[c])}
        hint = line["hint"] if "hint" in line and not pd.isna(line["hint"]) else None
        message = [dict(type="image", value=p) for p in paths]
        message.append(dict(type="text", value=mcq_prompt(str(line["question"]), options, hint)))
        return message

    def generate_batch(self, messages: list[list[dict]], batch_size: int = 8, desc: str = "vlmeval") -> list[str]:
        requests = [message_to_request(self.preproc_content(m)) for m in messages]
        return self.generator.generate(requests, batch_size=batch_size, max_new_tokens=self.max_new_tokens, desc=desc)

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        return self.generator.generate([message_to_request(message)], batch_size=1,
                                       max_new_tokens=self.max_new_tokens, desc=dataset or MODEL_NAME)[0]
