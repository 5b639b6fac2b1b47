"""The built-in scorer on hand-made benchmarks with known answers; generation is a scripted fake
(a unit test of reading, prompting, extraction, per-category scoring and the files written)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dpa_core.errors import DPAInputError
from dpa_core.evaluation import evaluate_tsv
from dpa_core.evaluation.generation import MCQ_INSTRUCTION, SHORT_ANSWER_INSTRUCTION
from dpa_core.evaluation.tsv_benchmark import (MCQ, SHORT_ANSWER, image_to_base64, load_item_images, read_tsv_benchmark,
                                                write_benchmark_tsv)

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def mcq_rows() -> list[dict]:
    rows = []
    for i, color in enumerate(["red", "green", "blue", "yellow", "red", "green"]):
        rows.append({"index": i, "image": Image.new("RGB", (8, 8), COLORS[color]), "question": "What colour is it?",
                     "A": "red", "B": "green", "C": "blue", "D": "yellow", "answer": "ABCD"[list(COLORS).index(color)],
                     "category": "color" if i < 4 else "repeat"})
    return rows


class ScriptedGenerator:
    """Replies by question index; records what it was asked."""

    def __init__(self, replies: list[str]):
        self.replies, self.requests, self.kwargs = replies, [], None

    def __call__(self, requests, **kwargs):
        self.requests, self.kwargs = list(requests), kwargs
        return [self.replies[i] for i in range(len(requests))]


def test_mcq_scores_per_category(tmp_path):
    tsv = write_benchmark_tsv(mcq_rows(), tmp_path / "toy_mcq.tsv")
    # answers: A B C D A B ; replies: right, right (text), wrong, unparsed, right ("answer is"), wrong
    gen = ScriptedGenerator(["A", "green", "(A)", "I do not know", "The answer is A.", "C. blue"])
    metrics = evaluate_tsv(None, tsv, tmp_path / "out", generator=gen, batch_size=3, max_new_tokens=5)

    assert metrics["toy_mcq/overall"] == pytest.approx(3 / 6)
    assert metrics["toy_mcq/color"] == pytest.approx(2 / 4)
    assert metrics["toy_mcq/repeat"] == pytest.approx(1 / 2)
    assert metrics["meta/toy_mcq/n"] == 6 and metrics["meta/toy_mcq/n_unparsed"] == 1
    assert gen.kwargs["batch_size"] == 3 and gen.kwargs["max_new_tokens"] == 5

    prompt = gen.requests[0].prompt
    assert prompt == f"What colour is it?\nA. red\nB. green\nC. blue\nD. yellow\n{MCQ_INSTRUCTION}"
    image = gen.requests[0].image_list()[0]
    assert image.size == (8, 8) and image.getpixel((0, 0)) == (255, 0, 0)

    out = tmp_path / "out"
    assert json.loads((out / "scores.json").read_text()) == metrics
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "toy_mcq" and summary["n"] == 6 and summary["n_unparsed"] == 1
    assert summary["by_category"] == {"color": 0.5, "repeat": 0.5}
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["extracted"] for p in preds] == ["A", "B", "A", None, "A", "C"]
    assert [p["correct"] for p in preds] == [True, True, False, False, True, False]
    assert preds[3]["unparsed"] is True and preds[3]["prediction"] == "I do not know"
    assert set(preds[0]) == {"index", "category", "prediction", "extracted", "answer", "correct", "unparsed"}


def test_limit_and_name(tmp_path):
    tsv = write_benchmark_tsv(mcq_rows(), tmp_path / "bench.tsv")
    gen = ScriptedGenerator(["A", "B"])
    metrics = evaluate_tsv(None, tsv, tmp_path / "out", name="first2", limit=2, generator=gen)
    assert metrics["first2/overall"] == 1.0 and metrics["meta/first2/n"] == 2


def test_short_answer_benchmark(tmp_path):
    img = Image.new("RGB", (8, 8), COLORS["blue"])
    rows = [
        {"index": "q1", "image": img, "question": "Colour?", "answer": "blue", "category": "color"},
        {"index": "q2", "image": "q1", "question": "How many shapes?", "answer": "['3', 'three']", "category": "count"},
        {"index": "q3", "image": "q1", "question": "Shape?", "answer": "square", "category": "shape"},
    ]
    tsv = write_benchmark_tsv(rows, tmp_path / "open.tsv")
    bench = read_tsv_benchmark(tsv)
    assert bench.kind == SHORT_ANSWER
    assert load_item_images(bench.items[1])[0].getpixel((0, 0)) == (0, 0, 255)  # image by reference to row q1
    gen = ScriptedGenerator(["Blue.", "three", ""])
    metrics = evaluate_tsv(None, tsv, tmp_path / "out", generator=gen)
    assert gen.requests[0].prompt == f"Colour?\n{SHORT_ANSWER_INSTRUCTION}"
    assert metrics["open/overall"] == pytest.approx(2 / 3)
    assert metrics["open/shape"] == 0.0 and metrics["meta/open/n_unparsed"] == 1


def test_hint_goes_before_question(tmp_path):
    rows = [{"index": 0, "image": Image.new("RGB", (8, 8)), "hint": "Look closely.", "question": "Q?",
             "A": "x", "B": "y", "answer": "B"}]
    gen = ScriptedGenerator(["B"])
    metrics = evaluate_tsv(None, write_benchmark_tsv(rows, tmp_path / "h.tsv"), tmp_path / "out", generator=gen)
    assert gen.requests[0].prompt.startswith("Look closely.\nQ?\nA. x\nB. y\n")
    assert metrics["h/all"] == 1.0  # no category column: one category "all"


@pytest.mark.parametrize("rows,message", [
    ([{"index": 0, "question": "Q", "A": "x", "B": "y", "answer": "C"}], "not one of this row's option letters"),
    ([{"index": 0, "question": "Q", "A": "x", "B": "y"}], "missing column"),
    ([{"index": 0, "question": "Q", "A": "x", "B": "y", "answer": "A"},
      {"index": 0, "question": "Q", "A": "x", "B": "y", "answer": "A"}], "duplicate index"),
    ([{"index": 0, "image": "7", "question": "Q", "A": "x", "B": "y", "answer": "A"}], "neither base64"),
])
def test_bad_tsv_is_reported(tmp_path, rows, message):
    tsv = write_benchmark_tsv(rows, tmp_path / "bad.tsv")
    with pytest.raises(DPAInputError, match=message) as err:
        read_tsv_benchmark(tsv)
    assert "bad.tsv" in str(err.value) and "Fix:" in str(err.value)


def test_bad_image_is_reported(tmp_path):
    rows = [{"index": 0, "image": "x" * 100, "question": "Q", "A": "x", "B": "y", "answer": "A"}]
    bench = read_tsv_benchmark(write_benchmark_tsv(rows, tmp_path / "img.tsv"))
    assert bench.kind == MCQ
    with pytest.raises(DPAInputError, match="cannot decode the image"):
        load_item_images(bench.items[0], bench.path)


def test_missing_tsv(tmp_path):
    with pytest.raises(DPAInputError, match="not found"):
        read_tsv_benchmark(tmp_path / "nope.tsv")


def test_base64_roundtrip():
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    assert len(image_to_base64(img)) > 64
