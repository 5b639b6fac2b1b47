"""Data: LLaVA conversation records, their validation, and their encoding into training examples.

Record format (the public LLaVA datasets' own, JSON list or JSONL):
    {"id": "...", "image": "relative/to/image_root.png",
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
Text-only caption records for the proxy stage (JSONL): {"id": "...", "text": "..."}.

Three encodings:
- plain (alignment): image tokens, then the caption and an end marker; loss on the caption only;
- chat (instruction tuning): the LLM's own chat template; loss on assistant turns only;
- text (proxy stage): the caption text and an end marker; loss on every token.
The end marker of plain and text sequences is EOS, or "\n" as LLaVA's plain template (upstream).
Instruction records may be text-only (no image); caption records need an image.
Everything is validated when loaded, so bad records fail before training starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from PIL import Image

from .errors import DPAInputError
from .losses import IGNORE_INDEX

IMAGE_MARKER = "<image>"  # the image placeholder of the LLaVA data format, in the records' text
SequenceEnd = Literal["eos", "newline"]
AspectRatio = Literal["crop", "pad"]
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Record:
    id: str
    image: Path | None  # absolute, inside the image root
    turns: tuple[tuple[str, str], ...]  # (role: user|assistant, text)
    source: str  # file it came from, for error messages

    @property
    def caption(self) -> str:
        """The first assistant turn: the caption in a caption dataset."""
        return next(text for role, text in self.turns if role == "assistant")


def read_json_records(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DPAInputError("data file not found.", file=path, fix="check the path in params.yaml (data sources).")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DPAInputError(f"line {n} is not valid JSON ({e.msg}).", file=path,
                                        fix="write one JSON object per line.") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DPAInputError(f"not valid JSON (line {e.lineno}: {e.msg}).", file=path,
                            fix="write a JSON list of records, or use .jsonl with one record per line.") from None
    if not isinstance(data, list):
        raise DPAInputError("expected a JSON list of records.", file=path, fix="wrap the records in [ ... ].")
    return data


def resolve_image(image_root: Path, rel: str, *, file, record) -> Path:
    """The image path, refusing anything that escapes the image root (absolute paths, '..', links)."""
    root = image_root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DPAInputError(f"image path {rel!r} escapes the image root {root}.", file=file, record=record,
                            fix="use a path relative to the image root, without '..' or absolute parts.")
    return path


def check_image(path: Path, *, file, record) -> None:
    if not path.is_file():
        raise DPAInputError(f"image {path} does not exist.", file=file, record=record,
                            fix="restore the image, fix the record's 'image' field, or drop the record.")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        raise DPAInputError(f"image {path} is unreadable ({e}).", file=file, record=record,
                            fix="re-export the image or drop the record.") from None


def parse_record(raw: dict, *, file, image_root: Path | None, require_image: bool, check_images: bool,
                 image_token: str = IMAGE_MARKER) -> Record:
    """One validated record. The image placeholder may be written as the LLaVA marker or as the
    model's configured image token; it is kept as the LLaVA marker, which the Encoder maps to the
    model's token."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or rid in (None, ""):
        raise DPAInputError("record without an 'id'.", file=file, record=rid, fix="give every record a unique id.")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DPAInputError("no 'conversations' list.", file=file, record=rid,
                            fix="add conversations: [{from: human, value: ...}, {from: gpt, value: ...}].")
    turns = []
    for i, turn in enumerate(convs):
        role = ROLES.get(turn.get("from", turn.get("role")) if isinstance(turn, dict) else None)
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise DPAInputError(f"turn {i} needs 'from' (human|gpt) and a string 'value'.", file=file, record=rid,
                                fix="use the LLaVA conversation format.")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DPAInputError(f"turn {i} is from {role} but should be from {expected} (turns alternate, human first).",
                                file=file, record=rid, fix="reorder or merge the turns.")
        if role == "assistant" and not text.strip():
            raise DPAInputError(f"turn {i} has an empty answer.", file=file, record=rid,
                                fix="drop the record or fill in the answer.")
        if image_token != IMAGE_MARKER:
            text = text.replace(image_token, IMAGE_MARKER)
        turns.append((role, text))
    if turns[-1][0] != "assistant":
        raise DPAInputError("the conversation ends without an answer.", file=file, record=rid,
                            fix="end every conversation with a gpt turn.")
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    image = None
    if raw.get("image"):
        if markers != 1 or IMAGE_MARKER not in turns[0][1]:
            raise DPAInputError(f"a record with an image needs exactly one {IMAGE_MARKER} marker, in the first "
                                f"human turn (found {markers}).", file=file, record=rid,
                                fix=f"put {IMAGE_MARKER} once at the start of the first human turn.")
        if image_root is None:
            raise DPAInputError("record has an image but no image root was given.", file=file, record=rid,
                                fix="set image_root for this data source in params.yaml.")
        image = resolve_image(image_root, raw["image"], file=file, record=rid)
        if check_images:
            check_image(image, file=file, record=rid)
    elif require_image:
        raise DPAInputError("record has no 'image'.", file=file, record=rid,
                            fix="add the image path, or drop text-only records from multimodal data.")
    elif markers:
        raise DPAInputError(f"{IMAGE_MARKER} marker in a record without an image.", file=file, record=rid,
                            fix="remove the marker or add the image.")
    return Record(str(rid), image, tuple(turns), str(file))


def load_llava_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                       require_image: bool = True, check_images: bool = True,
                       image_token: str = IMAGE_MARKER) -> list[Record]:
    """Load and validate every record of a LLaVA-format file (unique ids, images inside the root)."""
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise DPAInputError(f"image root {root} is not a directory.", file=path,
                            fix="set image_root to the folder the records' image paths are relative to.")
    records, seen = [], set()
    for raw in read_json_records(path):
        rec = parse_record(raw, file=path, image_root=root, require_image=require_image, check_images=check_images,
                           image_token=image_token)
        if rec.id in seen:
            raise DPAInputError("duplicate id.", file=path, record=rec.id, fix="make record ids unique.")
        seen.add(rec.id)
        records.append(rec)
    if not records:
        raise DPAInputError("no records.", file=path, fix="point the data source at a non-empty file.")
    return records


def load_text_records(path: str | os.PathLike) -> list[dict]:
    """Text-only records {"id", "text"} for the proxy stage."""
    out = []
    for raw in read_json_records(path):
        if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or not raw["text"].strip():
            raise DPAInputError("text record needs a non-empty 'text'.", file=path,
                                record=raw.get("id") if isinstance(raw, dict) else None, fix="drop or fill it.")
        out.append(raw)
    return out


class Encoder:
    """Turns records into token ids and labels for one tokenizer and vision tower."""

    def __init__(self, tokenizer, image_token: str = IMAGE_MARKER, num_image_tokens: int = 0, max_length: int = 2048,
                 sequence_end: SequenceEnd = "eos", image_first: bool = False, system_prompt: str | None = None):
        if sequence_end not in ("eos", "newline"):
            raise DPAInputError(f"unknown sequence_end {sequence_end!r}.", fix="use sequence_end: eos or newline.")
        self.tok = tokenizer
        self.sequence_end = sequence_end
        # LLaVA's preprocess_multimodal moves a single <image> to the start of its turn ("<image>\n" + text).
        self.image_first = image_first
        self.system_prompt = system_prompt  # chat: a system message before every conversation (upstream's)
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if num_image_tokens else None
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [bos] if bos is not None and bos not in self.eos else []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _finish(self, ids: list[int], labels: list[int], rid) -> dict:
        if self.image_token_id is not None:
            ids, labels = self._expand_images(ids, labels)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if self.image_token_id is not None and ids.count(self.image_token_id) % max(self.num_image_tokens, 1):
            raise DPAInputError(f"max_length {self.max_length} cuts through the image tokens.", record=rid,
                                fix="raise data.max_length (it counts the image tokens).")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def _expand_images(self, ids, labels):
        out_ids, out_lab = [], []
        for t, l in zip(ids, labels):
            if t == self.image_token_id:
                out_ids += [t] * self.num_image_tokens
                out_lab += [IGNORE_INDEX] * self.num_image_tokens
            else:
                out_ids.append(t)
                out_lab.append(l)
        return out_ids, out_lab

    def _ended(self, text: str) -> list[int]:
        # Upstream's plain template tokenizes caption + "\n" as one string (the caption unstripped).
        if self.sequence_end == "newline":
            return self._ids(text + "\n")
        return self._ids(text.strip()) + self.eos

    def text(self, text: str, rid=None) -> dict:
        ids = self.bos + (self._ids(text) + self.eos if self.sequence_end == "eos" else self._ended(text))
        return self._finish(ids, [IGNORE_INDEX] * len(self.bos) + ids[len(self.bos):], rid)

    def plain(self, record: Record) -> dict:
        """LLaVA's "plain" alignment template: the image, then the caption; loss on the caption."""
        prefix = self.bos + [self.image_token_id]
        target = self._ended(record.caption)
        return self._finish(prefix + target, [IGNORE_INDEX] * len(prefix) + target, record.id)

    def _turns(self, record: Record):
        if not (self.image_first and record.image is not None):
            return record.turns
        out = []
        for role, text in record.turns:
            if text.count(IMAGE_MARKER) == 1 and not text.startswith(IMAGE_MARKER):
                text = (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()
            out.append((role, text))
        return tuple(out)

    def chat(self, record: Record) -> dict:
        """The LLM's own chat template; loss on assistant turns (answer and end-of-turn tokens).
        The records' image placeholder becomes the model's configured image token."""
        turns = self._turns(record)
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs = head + [{"role": r, "content": t.replace(IMAGE_MARKER, self.image_token) if self.image_token_id is not None
                        else t} for r, t in turns]
        full = self.tok.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, (role, _) in enumerate(turns, start=len(head)):
            if role != "assistant":
                continue
            prompt = self.tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            upto = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not (full.startswith(upto) and upto.startswith(prompt)):
                raise DPAInputError("the chat template does not render conversations incrementally, so the "
                                    "answer tokens cannot be located.", record=record.id,
                                    fix="use a chat template whose rendering of a conversation prefix is a prefix "
                                    "of the full rendering (true of Qwen, Llama 3 and Gemma templates).")
            spans.append((len(prompt), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(a <= s and e <= b for a, b in spans) and e > s else IGNORE_INDEX
                  for t, (s, e) in zip(ids, enc["offset_mapping"])]
        return self._finish(ids, labels, record.id)


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: pad the short side symmetrically with `fill`, keeping every pixel."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(image: Image.Image, image_processor, aspect_ratio: AspectRatio = "crop") -> torch.Tensor:
    """pixel_values [3, H, W]. crop: the processor as is (CLIP: resize the short side, centre crop);
    pad: first pad to a square with the processor's mean colour (upstream `image_aspect_ratio pad`)."""
    if aspect_ratio == "pad":
        image = expand_to_square(image, tuple(int(x * 255) for x in image_processor.image_mean))
    elif aspect_ratio != "crop":
        raise DPAInputError(f"unknown image_aspect_ratio {aspect_ratio!r}.", fix="use image_aspect_ratio: crop or pad.")
    return image_processor(image, return_tensors="pt")["pixel_values"][0]


def word_count(record: Record) -> int:
    return sum(len(text.split()) for _, text in record.turns)


class MultimodalDataset(torch.utils.data.Dataset):
    """Records encoded with `encode` (Encoder.plain or Encoder.chat), images loaded on access.
    Text-only records (instruction data) give examples without pixel_values."""

    def __init__(self, records: Sequence[Record], encode: Callable[[Record], dict], image_processor,
                 image_aspect_ratio: AspectRatio = "crop"):
        if image_aspect_ratio not in ("crop", "pad"):
            raise DPAInputError(f"unknown image_aspect_ratio {image_aspect_ratio!r}.",
                                fix="use image_aspect_ratio: crop or pad.")
        self.records, self.encode, self.image_processor = list(records), encode, image_processor
        self.image_aspect_ratio = image_aspect_ratio

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's modality_lengths: word count, negative for text-only records (for the grouped sampler)."""
        return [max(word_count(r), 1) * (1 if r.image is not None else -1) for r in self.records]

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        ex = self.encode(rec)
        if rec.image is not None:
            ex["pixel_values"] = preprocess_image(load_image(rec.image), self.image_processor, self.image_aspect_ratio)
        return ex


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, texts: Sequence[dict], encoder: Encoder):
        self.texts, self.encoder = list(texts), encoder

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return self.encoder.text(self.texts[i]["text"], self.texts[i].get("id"))


@dataclass
class Collator:
    """Pads a list of examples into a batch (right padding by default)."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            sl = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[b, sl], labels[b, sl], mask[b, sl] = e["input_ids"], e["labels"], 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        # One image per record that has one, in batch order (the model fills the image tokens in that order);
        # a batch of text-only records has no pixel_values.
        images = [e["pixel_values"] for e in examples if "pixel_values" in e]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
