"""Answer extraction, short-answer matching, flat metric names and benchmark specs: pure logic, fast."""

from __future__ import annotations

import pytest

from dpa_core.errors import DPAInputError
from dpa_core.evaluation.answer_extraction import extract_option, match_short_answer, parse_answer_list
from dpa_core.evaluation.benchmark_specs import parse_specs
from dpa_core.evaluation.flat_metrics import check_flat, flatten_summary

OPTIONS = {"A": "blue square", "B": "red circle", "C": "green triangle", "D": "red"}

MCQ_CASES = [
    # (reply, expected letter or None for unparsed)
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("[D]", "D"),
    ("d)", "D"),
    ("  C  ", "C"),
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("Answer: (C)", "C"),
    ("answer: c.", "C"),
    ("The correct option is D because the shape is red", "D"),
    ("The answer is (A)", "A"),
    ("B. red circle", "B"),
    ("(B) red circle", "B"),
    ("C: green triangle", "C"),
    ("red circle", "B"),
    ("Red Circle.", "B"),
    ("A red circle", "B"),  # "A" is the article here, the text names option B
    ("the answer is a red circle", "B"),
    ("It is a green triangle!", "C"),
    ("red", "D"),  # exact text of D; "red" inside "red circle" is not B
    ("I think it is C", "C"),
    ("A is correct", "A"),
    ("A or B", None),  # two different options
    ("Option B is wrong, the answer is C", None),
    ("blue square and red circle", None),
    ("", None),
    ("???", None),
    ("E", None),  # not an option of this question
    ("a big shape", None),
]


@pytest.mark.parametrize("reply,expected", MCQ_CASES)
def test_extract_option(reply, expected):
    assert extract_option(reply, OPTIONS) == expected


def test_extract_option_two_options_only():
    assert extract_option("C", {"A": "yes", "B": "no"}) is None
    assert extract_option("No.", {"A": "yes", "B": "no"}) == "B"
    assert extract_option(None, {"A": "yes", "B": "no"}) is None


@pytest.mark.parametrize("reply,answers,correct", [
    ("Red", ["red"], True),
    ("It is red.", ["red"], True),
    ("reddish", ["red"], False),
    ("three", ["3", "three"], True),
    ("", ["red"], False),
    ("The Eiffel Tower", ["eiffel tower"], True),
])
def test_match_short_answer(reply, answers, correct):
    ok, extracted = match_short_answer(reply, answers)
    assert ok is correct
    assert (extracted is None) == (reply == "")


def test_answer_list_literal():
    assert parse_answer_list("['a', 'b']") == ["a", "b"]
    assert parse_answer_list("plain [text") == ["plain [text"]
    assert parse_answer_list("[not python") == ["[not python"]


def test_flat_metrics_keys():
    summary = {"benchmark": "toy mcq", "overall": 0.5, "by_category": {"color": 1.0, "overall": 0.0, "a/b": 0.5},
               "n": 4, "n_correct": 2, "n_unparsed": 1}
    flat = flatten_summary(summary)
    assert flat == {"toy_mcq/overall": 0.5, "toy_mcq/color": 1.0, "toy_mcq/cat_overall": 0.0, "toy_mcq/a_b": 0.5,
                    "meta/toy_mcq/n": 4, "meta/toy_mcq/n_correct": 2, "meta/toy_mcq/n_unparsed": 1}
    assert check_flat(flat) is flat
    with pytest.raises(ValueError):
        check_flat({"x/overall": float("nan")})
    with pytest.raises(ValueError):
        check_flat({"x/overall": "0.5"})


def test_benchmark_specs_are_checked():
    specs = parse_specs([{"name": "toy_mcq", "kind": "builtin_tsv", "path": "x.tsv"},
                         {"name": "mmb", "kind": "vlmeval", "task": "MMBench_DEV_EN", "allow_download": True},
                         {"name": "facts", "kind": "lmeval", "path": "f.jsonl", "prompt": "{{question}}"}])
    assert [s.kind for s in specs] == ["builtin_tsv", "vlmeval", "lmeval"]
    assert specs[1].option("allow_download") is True
    bad = [
        [{"name": "x", "kind": "nope", "path": "p"}],
        [{"name": "x", "kind": "builtin_tsv"}],
        [{"name": "x", "kind": "vlmeval"}],
        [{"name": "x", "kind": "lmeval", "path": "a", "task": "b"}],
        [{"name": "x y", "kind": "builtin_tsv", "path": "p"}],
        [{"name": "x", "kind": "builtin_tsv", "path": "p", "pth": "typo"}],
        [{"name": "x", "kind": "builtin_tsv", "path": "p"}, {"name": "x", "kind": "builtin_tsv", "path": "q"}],
    ]
    for spec in bad:
        with pytest.raises(DPAInputError):
            parse_specs(spec)
