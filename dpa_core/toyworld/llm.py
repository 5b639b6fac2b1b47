"""The base LLM: a tiny Qwen2ForCausalLM pretrained here on its own-style corpus, nanoGPT style
(all documents laid end to end, random windows, next-token loss on every token)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .chat import END_OF_TEXT, IM_END, IM_START
from .sizes import WorldSize


def make_llm(ws: WorldSize, tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=ws.llm_hidden,
        intermediate_size=ws.llm_intermediate,
        num_hidden_layers=ws.llm_layers,
        num_attention_heads=ws.llm_heads,
        num_key_value_heads=ws.llm_kv_heads,
        max_position_embeddings=ws.llm_max_positions,
        tie_word_embeddings=True,  # as the small Qwen2.5 models; halves the parameters here
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return Qwen2ForCausalLM(config)


def token_stream(tok: PreTrainedTokenizerFast, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents laid end to end, and the offset where each one starts."""
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    lengths = torch.tensor([len(doc) for doc in ids])
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long), starts


def answer_loss_mask(tok: PreTrainedTokenizerFast, stream: torch.Tensor) -> torch.Tensor:
    """Which tokens of the stream carry loss: every token of plain documents, and in chats only
    the assistant's answers (and their <|im_end|>), as in instruction tuning.

    Why: in a scene chat the description and the questions are random draws that no model can
    predict, and their loss drowns the few answer tokens that teach the skill the study needs,
    reading an answer out of the context. Measured on the default world (probe of open answers,
    300 held-out scene questions): with loss on every token the LLM stayed at chance after 3000
    steps; with loss on the answers it learns to read the scene (docs/toyworld.md)."""
    im_start, im_end = (tok.convert_tokens_to_ids(t) for t in (IM_START, IM_END))
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    ids = stream.tolist()
    mask = torch.ones(len(ids), dtype=torch.bool)
    ends = (stream == im_end).nonzero().flatten().tolist()
    k = 0
    for start in (stream == im_start).nonzero().flatten().tolist():
        while k < len(ends) and ends[k] < start:
            k += 1
        end = ends[k] if k < len(ends) else len(ids) - 1
        if ids[start + 1 : start + 1 + len(header)] == header:
            mask[start : start + 1 + len(header)] = False  # the header itself: predictable, but not the skill
        else:
            mask[start : end + 1] = False
    return mask


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak.

    transformers' get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=0.1) is the same curve one
    warmup step later (step / W: step 0 at lr 0). The shipped base models were trained with this one,
    and a rebuild with transformers' read scenes measurably worse (docs/toyworld.md, "The recipe is
    fragile"), so it stays until the recipe is changed on purpose."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Corpus(NamedTuple):
    """A tokenized corpus: its documents end to end, where each starts, which tokens carry loss."""

    stream: torch.Tensor
    doc_starts: torch.Tensor
    loss_mask: torch.Tensor


def tokenized_corpus(tok: PreTrainedTokenizerFast, docs: list[str]) -> Corpus:
    stream, starts = token_stream(tok, docs)
    return Corpus(stream, starts, answer_loss_mask(tok, stream))


class _Windows:
    """Random training windows of a corpus, each beginning at a document start (then running on
    into the next documents): a window cut into a chat would show answers without the scene they
    are about, and teach the model that the context does not matter."""

    def __init__(self, corpus: Corpus, block: int):
        self.block = min(block, len(corpus.stream))
        self.stream = corpus.stream
        self.labels = corpus.stream.masked_fill(~corpus.loss_mask, -100)
        self.starts = corpus.doc_starts[corpus.doc_starts <= len(corpus.stream) - self.block]

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts[torch.randint(0, len(self.starts), (size,), generator=gen)].tolist()
        return (torch.stack([self.stream[s : s + self.block] for s in starts]),
                torch.stack([self.labels[s : s + self.block] for s in starts]))


def pretrain(model: Qwen2ForCausalLM, corpus: Corpus, ws: WorldSize, seed: int,
             first_lessons: Corpus | None = None, on_step: Callable[[int, Qwen2ForCausalLM], None] | None = None) -> dict:
    """Train in place; returns loss statistics for the manifest.

    The first ws.llm_first_lessons_steps steps draw their windows from first_lessons (required
    then), the rest from corpus; one learning-rate schedule spans all ws.llm_steps. on_step(step,
    model) is called after each step (a probe may read the model; it must leave it in train mode)."""
    gen = torch.Generator().manual_seed(seed)
    main = _Windows(corpus, ws.llm_block)
    if ws.llm_first_lessons_steps and first_lessons is None:
        raise ValueError("llm_first_lessons_steps > 0 needs the first_lessons corpus")
    lessons = _Windows(first_lessons, ws.llm_block) if ws.llm_first_lessons_steps else None
    # No weight decay on embeddings, norms and biases (as nanoGPT): decay would wear down the
    # embeddings of rare tokens, such as the names the facts are about.
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=ws.llm_lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(ws.llm_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, ws.llm_steps, ws.llm_lr)
        windows = lessons if step < ws.llm_first_lessons_steps else main
        batch, target = windows.batch(ws.llm_batch, gen)
        loss = model(input_ids=batch, labels=target).loss  # the model shifts labels by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model)
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    stats = {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "tokens_in_corpus": len(corpus.stream),
             "loss_bearing_share": round(corpus.loss_mask.float().mean().item(), 4)}
    if lessons is not None:
        stats["first_lessons_tokens"] = len(first_lessons.stream)
    return stats


def save_llm(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, out_dir) -> None:
    # A chat turn ends with <|im_end|>; a document with <|endoftext|>: generation stops at either.
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(END_OF_TEXT)],
        pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
        do_sample=False,
    )
    model.save_pretrained(out_dir)  # safetensors
    tok.save_pretrained(out_dir)
