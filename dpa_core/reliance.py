"""Image reliance of an aligned connector: how much the image helps predict each caption token.

For every token of a held-out caption, in the alignment's own setting (vision tower + learned
connector + the LLM it was aligned against, "plain" template: image, then caption):

    r_j = log p(y_j | image, prefix) - log p(y_j | prefix without the image)

the second term from the text-only pass CMO uses (dpa_core/image_free.py). The means of r over
content tokens (tokens of content words: colours, shapes, positions, counts, relations) and over
style tokens (every other caption token) are the paper's word-level analysis as a metric: a
connector that carries visual content raises the content tokens; one pushed to carry style
raises the style tokens instead. Content words come from a word list (a JSON list of strings);
without one only the mean over all tokens is reported.

A token belongs to the words its characters overlap (tokenizer offsets); it is a content token when
one of them is a content word. The end-of-sequence token is not a caption token and is left out,
and so is a first caption token with no text before the image (no image-free prediction exists).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from .data import Collator, Encoder, MultimodalDataset, load_llava_records
from .errors import DPAInputError
from .image_free import efficient_hidden, llava_of, position_ids_for
from .losses import IGNORE_INDEX, label_scores_at, shift_labels, stand_in
from .main_pass import main_pass
from .settings import CaptionSet

_WORD = re.compile(r"[A-Za-z0-9]+")
KINDS = ("all", "content", "style")


def load_content_words(path: str | os.PathLike) -> frozenset[str]:
    """A JSON list of words (lower-cased here; an entry with spaces counts each of its words)."""
    path = Path(path)
    if not path.is_file():
        raise DPAInputError("content-word list not found.", file=path,
                            fix="point reliance.content_words at a JSON list of words, or set it to null "
                            "(then only the all-token mean is reported).")
    try:
        words = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DPAInputError(f"not valid JSON ({e.msg}, line {e.lineno}).", file=path,
                            fix='write a JSON list of words, e.g. ["red", "circle", "left"].') from None
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        bad = next((w for w in words if not (isinstance(w, str) and w.strip())), None) if isinstance(words, list) else words
        raise DPAInputError(f"expected a non-empty JSON list of non-empty strings, found {bad!r}.", file=path,
                            fix='write a JSON list of words, e.g. ["red", "circle", "left"].')
    return frozenset(part.lower() for w in words for part in _WORD.findall(w))


def content_flags(tokenizer, caption: str, content_words: frozenset[str]) -> list[bool]:
    """For each token of `caption` (tokenised as the alignment encodes it): is it part of a content word?"""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end(), m.group().lower() in content_words) for m in _WORD.finditer(caption)]
    return [any(c for s, e, c in spans if s < end and start < e) for start, end in enc["offset_mapping"]]


@torch.no_grad()
def token_reliance(model, batch: dict, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """r [B, S-1] (float32) at the shifted target positions and `valid` [B, S-1]: targets that have an
    image-free prediction (some text before the image). Position t scores label t+1."""
    position_ids = position_ids_for(batch["attention_mask"])
    labels = shift_labels(batch["labels"])
    target = labels != IGNORE_INDEX
    main = main_pass(model, batch, position_ids, target, stand_in(labels), chunk_tokens)
    hidden, has_source = efficient_hidden(model, batch["input_ids"], batch["attention_mask"], position_ids)
    valid = target & has_source[:, :-1]
    b, s1 = target.shape
    rows = valid.reshape(-1).nonzero(as_tuple=True)[0]
    hidden = hidden[:, :-1]
    lm_head = llava_of(model).lm_head
    _, logp_free = label_scores_at(rows, stand_in(labels).reshape(-1), lambda idx: lm_head(hidden[idx // s1, idx % s1]),
                                   chunk_tokens)
    r = torch.zeros(b * s1, dtype=torch.float32, device=target.device)
    r[rows] = main.logprob.reshape(-1)[rows] - logp_free
    return r.view(b, s1), valid


def caption_set_reliance(model, processor, records, encoder: Encoder, content_words: frozenset[str] | None,
                         batch_size: int = 16) -> dict[str, float]:
    """Sums and counts over one caption set -> {"all", "content", "style", "n_tokens", ...}."""
    dataset = MultimodalDataset(records, encoder.plain, processor.image_processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sums = {k: 0.0 for k in KINDS}
    counts = {k: 0 for k in KINDS}
    skipped = 0
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        batch = collate([dataset[i] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        r, valid = token_reliance(model, batch)
        target = shift_labels(batch["labels"]) != IGNORE_INDEX
        for row, i in enumerate(idx):
            caption = records[i].caption.strip()
            flags = content_flags(processor.tokenizer, caption, content_words or frozenset())
            positions = target[row].nonzero(as_tuple=True)[0].tolist()[: len(flags)]  # caption tokens, EOS left out
            for pos, is_content in zip(positions, flags):
                if not valid[row, pos]:
                    skipped += 1
                    continue
                value = float(r[row, pos])
                for kind in ("all", "content" if is_content else "style"):
                    sums[kind] += value
                    counts[kind] += 1
    kinds = KINDS if content_words is not None else ("all",)
    out = {k: sums[k] / counts[k] for k in kinds if counts[k]}
    out |= {f"n_tokens_{k}": counts[k] for k in kinds}
    return out | {"n_captions": len(records), "n_tokens_without_prefix": skipped}


def image_reliance(model, processor, caption_sets: Sequence[CaptionSet], *, num_image_tokens: int,
                   image_token: str = "<image>", content_words: frozenset[str] | None = None, batch_size: int = 16,
                   max_length: int = 2048, limit: int | None = None) -> dict[str, dict[str, float]]:
    """{set name: {"all", "content", "style", counts}} for an assembled Llava model (eval mode, no gradient)."""
    model.eval()
    encoder = Encoder(processor.tokenizer, image_token, num_image_tokens, max_length)
    out = {}
    for cs in caption_sets:
        records = load_llava_records(cs.path, cs.image_root)
        out[cs.name] = caption_set_reliance(model, processor, records[:limit] if limit else records, encoder,
                                            content_words, batch_size)
    return out


def flat_reliance(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """ "reliance/<set>/<kind>" for the means, "reliance/<set>/n_<...>" for the counts."""
    return {f"reliance/{name}/{k}": v for name, r in result.items() for k, v in r.items()}


def connector_reliance(paths, connector: Path, caption_sets: Sequence[CaptionSet], *, proxy_adapter: Path | None = None,
                       content_words_file: Path | None = None, batch_size: int = 16, max_length: int = 2048,
                       limit: int | None = None, device: str = "auto") -> dict[str, dict[str, float]]:
    """Image reliance of a connector from the align stage, with the LLM it was aligned against: the
    proxy LLM (base + merged proxy LoRA) when `proxy_adapter` is given, else the base LLM."""
    from .modeling import build_llava, vision_info
    from .stages import load_proxy_llm

    words = load_content_words(content_words_file) if content_words_file is not None else None
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    # bf16 where the GPU has it (as training), fp32 on CPU; the log-probabilities are taken in fp32.
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    lm = load_proxy_llm(paths.llm, Path(proxy_adapter), dtype) if proxy_adapter else None
    model, processor = build_llava(paths.vision, paths.llm, connector_path=connector, language_model=lm,
                                   image_token=paths.image_token, add_image_token=paths.add_image_token, dtype=dtype)
    model.to(dev)
    return image_reliance(model, processor, caption_sets, num_image_tokens=vision_info(paths.vision).num_image_tokens,
                          image_token=paths.image_token, content_words=words, batch_size=batch_size,
                          max_length=max_length, limit=limit)
