"""Write a benchmark in VLMEvalKit's TSV format (the reader is tsv_benchmark.read_tsv_benchmark)."""

from __future__ import annotations

import base64
import csv
import io
import os
from pathlib import Path

from PIL import Image

from ..io import write_text_atomic


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
