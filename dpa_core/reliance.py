"""Image reliance of an aligned connector: how much the image helps predict each caption token.

For every token of a held-out caption, in the alignment's own setting (vision tower + learned
connector + the LLM it was aligned against, "plain" template: image, then caption):

    r_j = log p(y_j | image, prefix) - log p(y_j | prefix without the image)

the second term from the text-only pass CMO uses (dpa_core/image_free.py). The means of r over
content tokens (tokens of content words: colours, shapes, positions, counts, relations) and over
style tokens (every other caption token) are the paper's word-level analysis as a metric: a
connector that carries visual content raises the content tokens; one pushed to carry style
raises the style tokens instead. Content words come from a word list: a JSON list of strings, or
an object of word classes ({"colour": [...], "shape": [...], ...}), which adds one mean per class
("content/colour", ...). Classes matter because a content word can be predicted from the register
alone: a connector that teaches a frozen LLM a florid register raises the count word in "no fewer
than one shape" without reading the image, and only the per-class split shows it. Without a word
list only the mean over all tokens is reported.

The text oracle: where a held-out caption record carries the scene as text (a "scene_text" field,
written in the LLM's own words; the toy world writes it), the same means are computed for that text
in place of the image:

    o_j = log p(y_j | scene text, prefix) - log p(y_j | prefix)

with the same LLM and no vision tower: what a connector that handed the LLM the scene as its own
words would give. It asks whether the frozen LLM copies what its context says into a caption at
all; where it does not (o_j <= 0 on colour and shape), training the connector alone has no
word-reading circuit to feed, whatever the loss. It is a reference point, not a bound: a trained
connector's tokens are not restricted to words and can do somewhat better.

A token belongs to the words its characters overlap (tokenizer offsets); it is a content token when
one of them is a content word. The end-of-sequence token is not a caption token and is left out,
and so is a first caption token with no text before the image (no image-free prediction exists).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch

from .data import Collator, Encoder, MultimodalDataset, load_llava_records
from .errors import DPAInputError
from .image_free import efficient_hidden, llava_of, position_ids_for
from .losses import IGNORE_INDEX, label_scores_at, shift_labels, stand_in
from .main_pass import main_pass
from .settings import CaptionSet

_WORD = re.compile(r"[A-Za-z0-9]+")
KINDS = ("all", "content", "style")


CONTENT = "content"  # the class of every word of a plain word list


def load_content_words(path: str | os.PathLike) -> dict[str, str]:
    """{word: class} from a JSON list of words (class "content") or a JSON object {class: [words]}.
    Words are lower-cased; an entry with spaces counts each of its words."""
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
    classes = words if isinstance(words, dict) else {CONTENT: words}
    out: dict[str, str] = {}
    for name, members in classes.items():
        if not isinstance(members, list) or not members or not all(isinstance(w, str) and w.strip() for w in members):
            bad = next((w for w in members if not (isinstance(w, str) and w.strip())), None) \
                if isinstance(members, list) else members
            where = "" if name == CONTENT and not isinstance(words, dict) else f" in class {name!r}"
            raise DPAInputError(f"expected a non-empty JSON list of non-empty strings{where}, found {bad!r}.", file=path,
                                fix='write a JSON list of words, e.g. ["red", "circle", "left"], or an object of '
                                'word classes, e.g. {"colour": ["red"], "shape": ["circle"]}.')
        for part in (part.lower() for w in members for part in _WORD.findall(w)):
            if out.setdefault(part, name) != name:
                raise DPAInputError(f"the word {part!r} is in two classes ({out[part]!r} and {name!r}).", file=path,
                                    record=part, fix="put every word in one class only.")
    return out


def token_classes(tokenizer, caption: str, words: Mapping[str, str]) -> list[str | None]:
    """For each token of `caption` (tokenised as the alignment encodes it): the class of the first content
    word it overlaps, None for a style token."""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end(), words.get(m.group().lower())) for m in _WORD.finditer(caption)]
    return [next((c for s, e, c in spans if c is not None and s < end and start < e), None)
            for start, end in enc["offset_mapping"]]


def content_flags(tokenizer, caption: str, content_words: Collection[str]) -> list[bool]:
    """For each token of `caption` (tokenised as the alignment encodes it): is it part of a content word?"""
    return [c is not None for c in token_classes(tokenizer, caption, dict.fromkeys(content_words, CONTENT))]


class _Tally:
    """Sums and counts of per-token values by kind (all, content, style) and content class."""

    def __init__(self, words: Mapping[str, str] | None):
        self.words = words
        self.per_class = words is not None and set(words.values()) != {CONTENT}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, value: float, cls: str | None) -> None:
        keys = ["all"]
        if self.words is not None:
            keys.append("style" if cls is None else "content")
            if cls is not None and self.per_class:
                keys.append(f"content/{cls}")
        for k in keys:
            self.sums[k] = self.sums.get(k, 0.0) + value
            self.counts[k] = self.counts.get(k, 0) + 1

    def result(self) -> dict:
        kinds = KINDS if self.words is not None else ("all",)
        classes = sorted(k for k in self.counts if k.startswith("content/"))
        out = {k: self.sums[k] / self.counts[k] for k in (*kinds, *classes) if self.counts.get(k)}
        return out | {f"n_tokens_{k}": self.counts.get(k, 0) for k in (*kinds, *classes)}


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


def caption_set_reliance(model, processor, records, encoder: Encoder, content_words: Mapping[str, str] | None,
                         batch_size: int = 16) -> dict[str, float]:
    """Means and counts over one caption set -> {"all", "content", "style", "content/<class>", "n_tokens_...", ...}."""
    dataset = MultimodalDataset(records, encoder.plain, processor.image_processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tally = _Tally(content_words)
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
            classes = token_classes(processor.tokenizer, caption, content_words or {})
            positions = target[row].nonzero(as_tuple=True)[0].tolist()[: len(classes)]  # caption tokens, EOS left out
            for pos, cls in zip(positions, classes):
                if not valid[row, pos]:
                    skipped += 1
                    continue
                tally.add(float(r[row, pos]), cls)
    return tally.result() | {"n_captions": len(records), "n_tokens_without_prefix": skipped}


def _caption_logprobs(lm, prefix: list[int], ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | prefix, ids[:j]) for every j with something before it (j >= 1 when prefix is empty)."""
    device = next(lm.parameters()).device
    x = torch.tensor([prefix + ids], device=device)
    logp = lm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().log_softmax(-1)
    first = 0 if prefix else 1
    rows = torch.arange(len(prefix) + first - 1, len(prefix) + len(ids) - 1, device=device)
    return logp[rows, torch.tensor(ids[first:], device=device)]


@torch.no_grad()
def text_oracle_reliance(lm, tokenizer, records, scene_texts: Mapping[str, str], content_words: Mapping[str, str] | None
                         ) -> dict[str, float] | None:
    """The text oracle over one caption set (module docstring): o_j for every caption token of the records
    that have a scene text, with `lm` (a causal LM, or the Llava model without images). None when no
    record has one. The scene text takes the image's place: [bos], scene text + newline, caption."""
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if bos is not None and bos != tokenizer.eos_token_id else []
    tally = _Tally(content_words)
    used = skipped = 0
    for rec in records:
        scene = scene_texts.get(rec.id)
        if not scene:
            continue
        caption = rec.caption.strip()
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        free = _caption_logprobs(lm, head, ids)  # without a bos the first caption token has no prediction
        lost = len(ids) - len(free)
        oracle = _caption_logprobs(lm, head + tokenizer(scene + "\n", add_special_tokens=False)["input_ids"], ids)[lost:]
        classes = token_classes(tokenizer, caption, content_words or {})[lost:]
        for value, cls in zip((oracle - free).tolist(), classes):
            tally.add(value, cls)
        skipped += lost
        used += 1
    if not used:
        return None
    return tally.result() | {"n_captions": used, "n_tokens_without_prefix": skipped}


def scene_texts_of(path: str | os.PathLike) -> dict[str, str]:
    """{record id: scene_text} for the records of a LLaVA-format file that carry one (others are left out)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {str(r["id"]): r["scene_text"] for r in raw if isinstance(r, dict) and isinstance(r.get("scene_text"), str)
            and r["scene_text"].strip() and r.get("id") not in (None, "")}


ORACLE_PREFIX = "text_oracle/"


def image_reliance(model, processor, caption_sets: Sequence[CaptionSet], *, num_image_tokens: int,
                   image_token: str = "<image>", content_words: Mapping[str, str] | None = None, batch_size: int = 16,
                   max_length: int = 2048, limit: int | None = None) -> dict[str, dict[str, float]]:
    """{set name: {"all", "content", "style", counts}} for an assembled Llava model (eval mode, no gradient).
    A set whose records carry scene texts also gets the text oracle, as "text_oracle/<set name>"."""
    model.eval()
    encoder = Encoder(processor.tokenizer, image_token, num_image_tokens, max_length)
    out = {}
    for cs in caption_sets:
        records = load_llava_records(cs.path, cs.image_root)
        records = records[:limit] if limit else records
        out[cs.name] = caption_set_reliance(model, processor, records, encoder, content_words, batch_size)
        oracle = text_oracle_reliance(model, processor.tokenizer, records, scene_texts_of(cs.path), content_words)
        if oracle is not None:
            out[ORACLE_PREFIX + cs.name] = oracle
    return out


def flat_reliance(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """ "reliance/<set>/<kind>" for the means, "reliance/<set>/n_<...>" for the counts (the text oracle's
    set names start with "text_oracle/")."""
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
