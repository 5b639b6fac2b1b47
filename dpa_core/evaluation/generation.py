"""Greedy, batched answer generation with a saved Llava checkpoint (CPU or GPU), and the question
prompts it is asked.

Batches are left-padded: a decoder continues from the last position of each row, so the prompts
must end at the same column. Requests are sorted by prompt length first, so a batch pads little.

The prompts are worded as LLaVA's evaluation (and VLMEvalKit's LLaVA adapter) words them, so that
scores are comparable with published LLaVA-style numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DPAInputError
from .tsv_benchmark import BenchmarkItem


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # the user's text; the chat template and image placeholders are added here
    images: tuple[Image.Image, ...] = ()
    # Decodes the images when the request's batch runs, so a large benchmark never holds all its
    # pixels at once. Used instead of `images` when given.
    load_images: Callable[[], list[Image.Image]] | None = None
    # The start of the assistant's reply, put after the generation prompt (cloze scoring reads the
    # log-probability of this text).
    reply: str = ""

    def image_list(self) -> list[Image.Image]:
        return list(self.load_images()) if self.load_images is not None else list(self.images)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DPAInputError(f"device {device!r} was asked for but no CUDA GPU is visible.",
                            fix="use device: auto or cpu, or run on a machine with a GPU.")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU half precision is slow and lossy


def check_llava_dir(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DPAInputError("no config.json: not a saved model directory.", file=model_dir,
                            fix="point to a Llava checkpoint written by save_pretrained (the merge stage's output).")
    return model_dir


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whichever side the padding is on."""
    width = attention_mask.shape[1]
    return (width - 1) - attention_mask.flip(1).long().argmax(1)


class _ChatAnswerer:
    """Greedy replies and option-letter log-probabilities for chat prompts, in batches.

    Subclasses load a model and a tokenizer and turn requests into model inputs (`_encode`).
    """

    model = None

    @property
    def tokenizer(self):
        raise NotImplementedError

    def _encode(self, requests: list[GenerationRequest]):
        raise NotImplementedError

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest], max_new_tokens: int) -> list[str]:
        inputs = self._encode(requests)
        tokenizer = self.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _batched(self, requests: list, batch_size: int, desc: str, run) -> list:
        if batch_size < 1:
            raise DPAInputError(f"batch_size must be >= 1, got {batch_size}.", fix="set batch_size to 1 or more.")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, unit="q") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for i, result in zip(chunk, run(chunk), strict=True):
                    results[i] = result
                bar.update(len(chunk))
        return results

    def generate(self, requests: list[GenerationRequest], batch_size: int = 8, max_new_tokens: int = 16,
                 desc: str = "generating") -> list[str]:
        replies = self._batched(requests, batch_size, desc,
                                lambda chunk: self._generate_batch([requests[i] for i in chunk], max_new_tokens))
        return [r if r is not None else "" for r in replies]

    def __call__(self, requests: list[GenerationRequest], **kwargs) -> list[str]:
        return self.generate(requests, **kwargs)

    def letter_token_id(self, letter: str) -> int:
        """The one token an answer that is just this letter starts with (as the reply after the
        generation prompt is tokenised)."""
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DPAInputError(f"the option letter {letter!r} is {len(ids)} tokens for this tokenizer, so it has "
                                "no single log-probability at the answer position.",
                                fix="score this benchmark by generation only, or use option letters A-Z.")
        return ids[0]

    @torch.inference_mode()
    def _letter_batch(self, requests: list[GenerationRequest], letters: list[list[str]]) -> list[dict[str, float]]:
        inputs = self._encode(requests)
        mask = inputs["attention_mask"]
        # Positions that ignore padding, so left and right padding give the same numbers; only the
        # answer position of each row goes through the output layer (logits_to_keep).
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        last = last_positions(mask)
        logits = self.model(**inputs, position_ids=positions, use_cache=False,
                            logits_to_keep=last[:, None]).logits[:, -1]
        logp = logits.float().log_softmax(-1)
        return [{letter: float(logp[b, self.letter_token_id(letter)]) for letter in row}
                for b, row in enumerate(letters)]

    @torch.inference_mode()
    def _reply_batch(self, requests: list[GenerationRequest]) -> list[float]:
        inputs = self._encode(requests)
        mask, ids = inputs["attention_mask"], inputs["input_ids"]
        replies = [self.tokenizer(r.reply, add_special_tokens=False)["input_ids"] for r in requests]
        last = last_positions(mask)
        for b, reply in enumerate(replies):
            end = int(last[b]) + 1
            if not reply or ids[b, end - len(reply):end].tolist() != reply:
                raise DPAInputError(f"the reply {requests[b].reply!r} is not tokenised the same after the prompt as "
                                    "alone, so its log-probability cannot be read off.",
                                    fix="give cloze answers that start a new word after the generation prompt.")
        keep = max(len(r) for r in replies) + 1
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**inputs, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
        logp = logits.float().log_softmax(-1)  # row positions: the last `keep` of the padded width
        width = ids.shape[1]
        sums = []
        for b, reply in enumerate(replies):
            end = int(last[b]) + 1  # one past the reply's last token, in padded coordinates
            first = end - len(reply)  # the reply's first token; predicted at first - 1
            cols = torch.arange(first - 1, end - 1) - (width - keep)
            if int(cols.min()) < 0:
                raise ValueError("reply scoring needs left padding (the reply at the end of every row)")
            sums.append(float(logp[b, cols, torch.tensor(reply)].sum()))
        return sums

    def reply_logprobs(self, requests: list[GenerationRequest], replies: list[dict[str, str]], batch_size: int = 8,
                       desc: str = "cloze") -> list[dict[str, float]]:
        """log p(reply | prompt, generation prompt), summed over the reply's tokens, for each request's
        candidate replies ({option letter: the answer it makes}): the cloze formulation of multiple
        choice (lm-eval's loglikelihood of each continuation)."""
        if len(replies) != len(requests):
            raise ValueError("one dict of candidate replies per request")
        flat = [(i, letter, GenerationRequest(r.prompt, r.images, r.load_images, reply=text))
                for i, (r, cands) in enumerate(zip(requests, replies)) for letter, text in cands.items()]
        rows = [req for _, _, req in flat]
        sums = self._batched(rows, batch_size, desc, lambda chunk: self._reply_batch([rows[j] for j in chunk]))
        out: list[dict[str, float]] = [{} for _ in requests]
        for (i, letter, _), value in zip(flat, sums, strict=True):
            out[i][letter] = value
        return out

    def option_logprobs(self, requests: list[GenerationRequest], letters: list[list[str]], batch_size: int = 8,
                        desc: str = "likelihood") -> list[dict[str, float]]:
        """log p(letter | prompt, generation prompt) for each request's option letters: one forward per
        batch, read at the position where the reply starts (lm-eval's multiple-choice scoring)."""
        if len(letters) != len(requests):
            raise ValueError("one list of option letters per request")
        return self._batched(requests, batch_size, desc,
                             lambda chunk: self._letter_batch([requests[i] for i in chunk], [letters[i] for i in chunk]))


class LlavaGenerator(_ChatAnswerer):
    """Loads a Llava checkpoint once; answers many (prompt, images) requests."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", dtype: torch.dtype | None = None):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_dir = check_llava_dir(model_dir)
        self.device = resolve_device(device)
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = LlavaForConditionalGeneration.from_pretrained(
            self.model_dir, dtype=dtype or default_dtype(self.device)).to(self.device).eval()

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def chat_text(self, prompt: str, n_images: int) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def _encode(self, requests: list[GenerationRequest]):
        per_request = [r.image_list() for r in requests]
        texts = [self.chat_text(r.prompt, len(imgs)) + r.reply for r, imgs in zip(requests, per_request)]
        images = [img for imgs in per_request for img in imgs]
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs


class TextChatModel(_ChatAnswerer):
    """A plain causal LM (e.g. the base LLM) answering text-only requests through its chat template:
    the text-oracle ceiling asks it the benchmark's questions with the scene given as text."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", dtype: torch.dtype | None = None,
                 model: torch.nn.Module | None = None):
        """`model`: an LM already in memory to ask instead of loading `model_dir`'s (e.g. the proxy LLM,
        the base LLM with its LoRA merged); `model_dir` still gives the tokenizer and its chat template."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise DPAInputError("no config.json: not a saved model directory.", file=self.model_dir,
                                fix="point to a causal LM written by save_pretrained (e.g. model.llm).")
        self.device = resolve_device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        dtype = dtype or default_dtype(self.device)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model = model.to(self.device, dtype).eval()

    @property
    def tokenizer(self):
        return self._tokenizer

    def chat_text(self, prompt: str) -> str:
        return self._tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=False)

    def _encode(self, requests: list[GenerationRequest]):
        if any(r.images or r.load_images is not None for r in requests):
            raise ValueError("TextChatModel answers text-only requests")
        texts = [self.chat_text(r.prompt) + r.reply for r in requests]
        return self._tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)


# ---- The question prompts ----------------------------------------------------------------------

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return f"{text}\n{MCQ_INSTRUCTION}"


def short_answer_prompt(question: str, hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    return f"{text}\n{SHORT_ANSWER_INSTRUCTION}"


def cloze_prompt(item: BenchmarkItem) -> str:
    """The cloze formulation: the plain question, no options and no instruction; each option is
    then scored as the answer it would make (BenchmarkItem.cloze)."""
    return f"{item.hint}\n{item.question}" if item.hint else item.question


def item_prompt(item: BenchmarkItem) -> str:
    if item.options:
        return mcq_prompt(item.question, item.options, item.hint)
    return short_answer_prompt(item.question, item.hint)
