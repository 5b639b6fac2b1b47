"""The compare stage on hand-made scores: means, spreads over seeds, DPA − Vanilla."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipelines.compare import build_comparison
from pipelines.params import load_params
from pipelines.stages import Layout

ROOT = Path(__file__).resolve().parents[1]


def write_scores(layout: Layout, arm: str, seed: int, scores: dict) -> None:
    d = layout.eval(arm, seed)
    d.mkdir(parents=True)
    (d / "scores.json").write_text(json.dumps(scores))


def test_table_means_spread_and_difference(tmp_path):
    p = load_params(ROOT / "params.yaml", {"study.seeds": [0, 1], "evaluate.reference_row": False})
    lay = Layout(tmp_path / "outputs")
    write_scores(lay, "dpa", 0, {"toy_mcq/overall": 0.6, "toy_mcq/color": 0.8, "text_facts/acc": 0.4})
    write_scores(lay, "dpa", 1, {"toy_mcq/overall": 0.4, "toy_mcq/color": 0.6, "text_facts/acc": 0.6})
    write_scores(lay, "vanilla", 0, {"toy_mcq/overall": 0.5, "toy_mcq/color": 0.5, "text_facts/acc": 0.3})
    write_scores(lay, "vanilla", 1, {"toy_mcq/overall": 0.3, "toy_mcq/color": 0.5, "text_facts/acc": 0.5})
    res = build_comparison(p, lay, lay.compare())
    m = res["metrics"]
    assert m["dpa/toy_mcq/overall"] == pytest.approx(0.5)
    # average = mean over seeds of the mean of the headline scores (overall, acc)
    assert m["dpa/average"] == pytest.approx(((0.6 + 0.4) / 2 + (0.4 + 0.6) / 2) / 2)
    assert m["vanilla/average"] == pytest.approx(((0.5 + 0.3) / 2 + (0.3 + 0.5) / 2) / 2)
    assert m["dpa_minus_vanilla/toy_mcq/color"] == pytest.approx(0.2)
    assert m["dpa_minus_vanilla/average"] == pytest.approx(0.1)
    md = (lay.compare() / "comparison.md").read_text()
    assert "| dpa | 2 | 50.0 ± 0.0 |" in md  # average of both seeds is 0.5 with no spread
    assert "50.0 ± 14.1" in md  # toy_mcq/overall of dpa: mean 0.5, sample std 0.1414
    rows = list(csv.DictReader((lay.compare() / "comparison.csv").open()))
    assert {r["arm"] for r in rows} == {"dpa", "vanilla", "dpa-vanilla"}
    assert (lay.compare() / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_scores_say_which_arm(tmp_path):
    p = load_params(ROOT / "params.yaml")
    lay = Layout(tmp_path / "outputs")
    write_scores(lay, "dpa", 0, {"toy_mcq/overall": 0.5})
    with pytest.raises(Exception, match="no scores for arm 'vanilla' seed 0"):
        build_comparison(p, lay, lay.compare())
    assert not lay.compare().exists()
