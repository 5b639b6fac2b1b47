"""Talk to a Llava checkpoint: one image, one or more turns, the reply streamed as it is generated.

Works on any Hugging Face `LlavaForConditionalGeneration` directory: the merge stage's output and
stock `llava-hf` checkpoints alike, on CPU or GPU. The conversation goes through the processor's
chat template (the image in the first user turn); a processor without one gets LLaVA-1.5's
`USER: <image>\\n... ASSISTANT:` format. `dpa chat` (pipelines/cli.py) is the command-line front.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TextIO

import torch
from PIL import Image

from .errors import DPAInputError
from .evaluation.generation import check_llava_dir, default_dtype, resolve_device

LLAVA_15_FALLBACK = "llava-1.5 (USER: <image>\\n... ASSISTANT:)"


def load_image(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DPAInputError("image not found.", file=path, fix="pass an existing image file with --image.")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises several types for unreadable files
        raise DPAInputError(f"not a readable image ({type(err).__name__}: {err}).", file=path,
                            fix="pass a PNG/JPEG/... image file.") from err


def _streamer(tokenizer, write: Callable[[str], None]):
    """A transformers TextStreamer that hands the decoded text (a word at a time) to `write`."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            write(text)

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class LlavaChat:
    """A conversation about one image with a Llava checkpoint."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", dtype: torch.dtype | None = None):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_dir = check_llava_dir(model_dir)
        config = self.model_dir / "config.json"
        if json.loads(config.read_text()).get("model_type") != "llava":
            raise DPAInputError("not a Llava checkpoint (config.json model_type is not 'llava').", file=config,
                                fix="pass a LlavaForConditionalGeneration directory (e.g. outputs/merged/dpa-seed0).")
        self.device = resolve_device(device)
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.model = LlavaForConditionalGeneration.from_pretrained(
            self.model_dir, dtype=dtype or default_dtype(self.device)).to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.template = "processor" if getattr(self.processor, "chat_template", None) else LLAVA_15_FALLBACK
        self.image: Image.Image | None = None
        self.turns: list[tuple[str, str]] = []

    def reset(self, image: Image.Image | None = None) -> None:
        """Start over (with a new image, when given)."""
        self.turns = []
        if image is not None:
            self.image = image

    def prompt_text(self, question: str) -> str:
        """The whole conversation so far plus `question`, rendered for generation."""
        turns = [*self.turns, (question, None)]
        if self.template == "processor":
            messages = []
            for i, (user, reply) in enumerate(turns):
                content = ([{"type": "image"}] if i == 0 and self.image is not None else []) + [
                    {"type": "text", "text": user}]
                messages.append({"role": "user", "content": content})
                if reply is not None:
                    messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "image_token", "<image>")
        parts = []
        for i, (user, reply) in enumerate(turns):
            image = f"{token}\n" if i == 0 and self.image is not None else ""
            parts.append(f"USER: {image}{user} ASSISTANT:" + (f" {reply}" if reply is not None else ""))
        return " ".join(parts)

    @torch.inference_mode()
    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
            stream: Callable[[str], None] | TextIO | None = None) -> str:
        """Generate the reply to `question` (greedy when temperature is 0), streaming its text to
        `stream` (a function or a text file) while it is generated; returns the whole reply."""
        if not question.strip():
            raise DPAInputError("empty prompt.", fix="type a question (or pass --prompt TEXT).")
        text = self.prompt_text(question)
        inputs = self.processor(text=[text], images=[self.image] if self.image is not None else None,
                                return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        write = stream.write if hasattr(stream, "write") else stream
        streamer = None
        if write is not None:
            def emit(chunk: str) -> None:
                write(chunk)
                if hasattr(stream, "flush"):
                    stream.flush()
            streamer = _streamer(self.tokenizer, emit)
        sample = temperature > 0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=temperature if sample else None, top_p=None, top_k=None,
                                  num_beams=1, pad_token_id=pad, streamer=streamer)
        reply = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.turns.append((question, reply))
        return reply
