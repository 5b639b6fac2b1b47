"""Read a benchmark in VLMEvalKit's TSV format into plain records, and write one from rows.

The format (one row per question, tab-separated, header line):
  index     unique id
  image     base64-encoded image; a value of <= 64 characters is the index of another row whose
            image is reused (VLMEvalKit's space saving); may be a Python-literal list of base64 images
  image_path  alternative to image: a path relative to the TSV (or absolute)
  question  the question text
  A, B, ... option texts; present => multiple choice, absent => short answer
  answer    the correct letter (multiple choice), or the answer text / a Python-literal list of
            accepted answers (short answer)
  category  optional, for per-category accuracy; hint: optional context put before the question
  scene_text  optional (our extension; VLMEvalKit ignores it): what the image shows, as text, for
            the text-oracle ceiling (the LLM alone, told the scene in words)
  cloze_A, cloze_B, ...  optional (our extension): the full answer each option would make
            ("the circle is red."), for the cloze formulation: the plain question, each option's
            answer scored by likelihood, no letters (OLMES's CF; docs/evaluation.md)
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..errors import DPAInputError
from ..io import write_text_atomic

MCQ = "mcq"
SHORT_ANSWER = "short_answer"
DEFAULT_CATEGORY = "all"
_REQUIRED_COLUMNS = ("index", "question", "answer")
_IMAGE_REF_MAX_LEN = 64  # VLMEvalKit: an image cell this short names another row instead of holding pixels


@dataclass(frozen=True)
class BenchmarkItem:
    index: str
    question: str
    answer: str
    category: str = DEFAULT_CATEGORY
    options: dict[str, str] = field(default_factory=dict)  # letter -> text; empty for short answer
    hint: str | None = None
    images_b64: tuple[str, ...] = ()
    image_paths: tuple[str, ...] = ()
    scene_text: str | None = None
    cloze: dict[str, str] = field(default_factory=dict)  # letter -> the answer that option makes; may be empty


@dataclass(frozen=True)
class TsvBenchmark:
    name: str
    path: Path
    kind: str  # MCQ or SHORT_ANSWER
    items: list[BenchmarkItem]


def _cell(row: pd.Series, column: str) -> str | None:
    if column not in row.index:
        return None
    value = row[column]
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _as_list(value: str) -> list[str]:
    """A cell that may hold a Python-literal list ("['a', 'b']") or a single value."""
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [value]


def _resolve_images(frame: pd.DataFrame, path: Path) -> dict[str, list[str]]:
    if "image" not in frame.columns:
        return {}
    raw = {str(i): _cell(r, "image") for i, (_, r) in zip(frame["index"], frame.iterrows())}
    resolved = {}
    for idx, value in raw.items():
        if value is None:
            resolved[idx] = []
            continue
        if len(value) <= _IMAGE_REF_MAX_LEN:
            target = raw.get(value)
            if target is None or len(target) <= _IMAGE_REF_MAX_LEN:
                raise DPAInputError(
                    f"the image cell {value!r} is neither base64 data nor the index of a row with an image.",
                    file=path, record=idx,
                    fix="put the base64-encoded image in the 'image' column (or the index of a row that has one).",
                )
            value = target
        resolved[idx] = _as_list(value)
    return resolved


def _options(row: pd.Series) -> dict[str, str]:
    return {letter: text for letter in string.ascii_uppercase if (text := _cell(row, letter)) is not None}


CLOZE_PREFIX = "cloze_"


def _cloze(row: pd.Series, options: dict[str, str], path: Path, idx: str) -> dict[str, str]:
    """The row's cloze answers: one per option, or none at all (the benchmark has no cloze columns)."""
    if not any(str(c).startswith(CLOZE_PREFIX) for c in row.index):
        return {}
    cloze = {letter: text for letter in options if (text := _cell(row, CLOZE_PREFIX + letter)) is not None}
    if set(cloze) != set(options):
        missing = sorted(set(options) - set(cloze))
        raise DPAInputError(f"no cloze answer for option(s) {missing}.", file=path, record=idx,
                            fix=f"fill {', '.join(CLOZE_PREFIX + m for m in missing)} (the answer that option "
                                "would make), or drop the cloze_* columns to score by letters only.")
    return cloze


def read_tsv_benchmark(path: str | os.PathLike, name: str | None = None, limit: int | None = None) -> TsvBenchmark:
    path = Path(path)
    if not path.is_file():
        raise DPAInputError("benchmark TSV not found.", file=path, fix="check the path in the benchmark spec.")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DPAInputError(f"cannot parse as TSV: {err}", file=path,
                            fix="write a tab-separated file with a header line (VLMEvalKit format).") from err
    missing = [c for c in _REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DPAInputError(f"missing column(s) {missing}; found {list(frame.columns)}.", file=path,
                            fix="use VLMEvalKit's TSV columns: index, image, question, A..D (MCQ), answer, category.")
    if frame["index"].duplicated().any():
        dup = frame["index"][frame["index"].duplicated()].iloc[0]
        raise DPAInputError("duplicate index.", file=path, record=dup, fix="give every row a unique index.")
    kind = MCQ if {"A", "B"} <= set(frame.columns) else SHORT_ANSWER
    images = _resolve_images(frame, path)
    if limit is not None:
        frame = frame.iloc[:limit]
    items = [_item(row, kind, images, path) for _, row in frame.iterrows()]
    if not items:
        raise DPAInputError("the benchmark has no rows.", file=path, fix="add questions, or drop the benchmark.")
    return TsvBenchmark(name=name or path.stem, path=path, kind=kind, items=items)


def _item(row: pd.Series, kind: str, images: dict[str, list[str]], path: Path) -> BenchmarkItem:
    idx = str(row["index"])
    question, answer = _cell(row, "question"), _cell(row, "answer")
    if question is None or answer is None:
        raise DPAInputError("empty question or answer.", file=path, record=idx, fix="fill in both cells.")
    options = _options(row) if kind == MCQ else {}
    if kind == MCQ and answer.strip() not in options:
        raise DPAInputError(
            f"answer {answer!r} is not one of this row's option letters {sorted(options)}.",
            file=path, record=idx, fix="put the correct option's letter (A, B, ...) in the 'answer' column.",
        )
    image_path = _cell(row, "image_path")
    paths = tuple(p if os.path.isabs(p) else str(path.parent / p) for p in _as_list(image_path)) if image_path else ()
    return BenchmarkItem(
        index=idx, question=question, answer=answer.strip() if kind == MCQ else answer,
        category=_cell(row, "category") or DEFAULT_CATEGORY, options=options, hint=_cell(row, "hint"),
        images_b64=tuple(images.get(idx, ())), image_paths=paths, scene_text=_cell(row, "scene_text"),
        cloze=_cloze(row, options, path, idx) if kind == MCQ else {},
    )


def load_item_images(item: BenchmarkItem, path: Path | None = None) -> list[Image.Image]:
    """Decode an item's images (base64 cells, else image_path files) as RGB."""
    try:
        if item.images_b64:
            return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in item.images_b64]
        return [Image.open(p).convert("RGB") for p in item.image_paths]
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as err:
        raise DPAInputError(
            f"cannot decode the image: {err}", file=path, record=item.index,
            fix="store a base64-encoded PNG/JPEG in 'image', or a readable file in 'image_path'.") from err


# ---- Writing ------------------------------------------------------------------------------------

def image_to_base64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_benchmark_tsv(rows: list[dict], path: str | os.PathLike) -> Path:
    """rows: dicts with index, question, answer, optional image (a PIL image or base64 string),
    A..D (multiple choice), category, hint. Columns are the union of the rows' keys, in VLMEvalKit's order."""
    order = ["index", "image", "question", "hint", *"ABCDEFGH", "answer", "category"]
    keys = {k for r in rows for k in r}
    columns = [c for c in order if c in keys] + sorted(keys - set(order))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(image_to_base64(value) if isinstance(value, Image.Image) else value)
        writer.writerow(cells)
    return write_text_atomic(path, buf.getvalue())
