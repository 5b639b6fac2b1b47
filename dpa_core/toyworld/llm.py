"""The base LLM: a tiny Qwen2ForCausalLM pretrained here on its own-style corpus, nanoGPT style
(all documents laid end to end, random windows, next-token loss on every token)."""

from __future__ import annotations

import math

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
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Qwen2ForCausalLM, stream: torch.Tensor, doc_starts: torch.Tensor, loss_mask: torch.Tensor,
             ws: WorldSize, seed: int) -> dict:
    """Train in place; returns loss statistics for the manifest.

    Every training window begins at a document start (then runs on into the next documents):
    a window cut into a chat would show answers without the scene they are about, and teach the
    model that the context does not matter."""
    gen = torch.Generator().manual_seed(seed)
    block = min(ws.llm_block, len(stream))
    doc_starts = doc_starts[doc_starts <= len(stream) - block]
    labels = stream.masked_fill(~loss_mask, -100)
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
        starts = doc_starts[torch.randint(0, len(doc_starts), (ws.llm_batch,), generator=gen)]
        batch = torch.stack([stream[s : s + block] for s in starts.tolist()])
        target = torch.stack([labels[s : s + block] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=target).loss  # the model shifts labels by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "tokens_in_corpus": len(stream),
            "loss_bearing_share": round(loss_mask.float().mean().item(), 4)}


def save_llm(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, out_dir) -> None:
    # A chat turn ends with <|im_end|>; a document with <|endoftext|>: generation stops at either.
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(END_OF_TEXT)],
        pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
        do_sample=False,
    )
    model.save_pretrained(out_dir)  # safetensors
    tok.save_pretrained(out_dir)
