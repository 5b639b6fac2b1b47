"""The conflict dial (pipelines/sweep.py): reading a point from a run's outputs, the table and the
plot (fast), and the whole sweep as DVC experiments at smoke size (slow)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from dpa_core.errors import DPAInputError
from pipelines.sweep import parse_values, read_point, table
from tests.e2e_helpers import make_repo_copy, subprocess_env


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fake_run(out, verbose_ppl, diff):
    _write(out / "metrics" / "world.json", {"prior_gap/ppl.own_style": 2.0})
    _write(out / "metrics" / "diagnose-seed0.json", {"ppl/base/verbose": verbose_ppl, "ppl/base/terse": 5.0})
    key = "dpa_minus_vanilla/toy_mcq/lik/overall"
    _write(out / "compare" / "metrics.json", {key: diff, f"{key}/ci_low": diff - 0.03, f"{key}/ci_high": diff + 0.03,
                                              f"{key}/inconclusive": int(abs(diff) < 0.03),
                                              "dpa/toy_mcq/lik/overall": 0.6 + diff, "vanilla/toy_mcq/lik/overall": 0.6})


def test_point_table_and_values(tmp_path):
    _fake_run(tmp_path, verbose_ppl=20.0, diff=0.05)
    point = read_point(tmp_path, 1.0)
    assert point["prior_gap_nats"] == pytest.approx(math.log(20.0) - math.log(2.0))
    d = point["toy_mcq/lik/overall"]
    assert d["diff"] == 0.05 and d["ci_low"] == pytest.approx(0.02) and not d["inconclusive"]
    assert "toy_mcq/overall" not in point  # a metric the run did not report is left out
    md = table([point])
    assert "| 1 | 2.30 | toy_mcq/lik/overall | 65.0 | 60.0 | +5.0 | [+2.0, +8.0] | DPA better |" in md

    _fake_run(tmp_path, verbose_ppl=20.0, diff=0.01)
    assert "inconclusive" in table([read_point(tmp_path, 1.0)])
    (tmp_path / "metrics" / "diagnose-seed0.json").unlink()
    with pytest.raises(DPAInputError, match="diagnose"):
        read_point(tmp_path, 1.0)

    assert parse_values("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("1", "0,2", "a,b"):
        with pytest.raises(DPAInputError):
            parse_values(bad)


@pytest.mark.slow
def test_conflict_sweep_at_smoke_size(tmp_path):
    """Two dial settings as two DVC experiments: the measured prior gap grows with the dial, each
    point carries DPA − Vanilla with a CI, the plot is written and params.yaml is restored."""
    repo = make_repo_copy(tmp_path, profile="smoke")
    before = (repo / "params.yaml").read_text()
    res = subprocess.run(["dpa", "sweep", "conflict", "--values", "0,1"], cwd=repo, env=subprocess_env(repo),
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((repo / "outputs/sweep/conflict.json").read_text())
    points = result["points"]
    assert [p["verbose_style"] for p in points] == [0.0, 1.0]
    assert points[0]["prior_gap_nats"] < points[1]["prior_gap_nats"]
    for p in points:
        d = p["toy_mcq/overall"]
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert (repo / "outputs/sweep/conflict.png").stat().st_size > 1000
    assert (repo / "params.yaml").read_text() == before
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=subprocess_env(repo), capture_output=True,
                           text=True, check=True).stdout
    assert shown.count('"verbose_style"') >= 2  # both points are DVC experiments with their params
