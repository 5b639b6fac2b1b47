"""The compare stage on hand-made scores: means, spreads over seeds, DPA − Vanilla."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipelines.compare import bootstrap_pair, build_comparison, collect_verdicts
from pipelines.params import load_params
from pipelines.entrypoints import Layout

ROOT = Path(__file__).resolve().parents[1]


def two_arms(overrides: dict | None = None):
    """params.yaml with DPA and Vanilla only (the default study also runs the no_align control)."""
    return load_params(ROOT / "params.yaml", {"study.plain_arms": ["vanilla"], **(overrides or {})})


def write_scores(layout: Layout, arm: str, seed: int, scores: dict) -> None:
    d = layout.eval(arm, seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "scores.json").write_text(json.dumps(scores))


def test_average_only_over_rows_with_every_benchmark(tmp_path):
    """The ceiling has no text benchmark: an average over fewer benchmarks would not be comparable."""
    p = two_arms({"evaluate.reference_row": True})
    lay = Layout(tmp_path / "outputs")
    write_scores(lay, "dpa", 0, {"toy_mcq/overall": 0.6, "text_facts/acc": 0.4})
    write_scores(lay, "vanilla", 0, {"toy_mcq/overall": 0.5, "text_facts/acc": 0.3})
    lay.eval_ceiling().mkdir(parents=True)
    (lay.eval_ceiling() / "scores.json").write_text(json.dumps({"toy_mcq/overall": 0.9}))
    m = build_comparison(p, lay, lay.compare())["metrics"]
    assert m["dpa/average"] == pytest.approx(0.5) and "ceiling/average" not in m
    assert m["ceiling/toy_mcq/overall"] == 0.9


def test_proxy_ceiling_row_per_seed_under_the_ceiling(tmp_path):
    """The diagnose stage's text oracle answered by the proxy LLM: one row, mean ± std over the seeds
    that have it, under the base LLM's ceiling; no row without the ceiling it is read against."""
    p = two_arms({"study.seeds": [0, 1], "evaluate.reference_row": True})
    lay = Layout(tmp_path / "outputs")
    for seed in (0, 1):
        write_scores(lay, "dpa", seed, {"toy_mcq/overall": 0.6})
        write_scores(lay, "vanilla", seed, {"toy_mcq/overall": 0.5})
    for seed, score in ((0, 0.7), (1, 0.5)):
        lay.diagnose(seed).mkdir(parents=True)
        (lay.diagnose(seed) / "scores.json").write_text(json.dumps({"toy_mcq/overall": score, "meta/x": 1}))
    m = build_comparison(p, lay, lay.compare())["metrics"]
    assert "proxy_ceiling/toy_mcq/overall" not in m  # no base ceiling yet
    lay.eval_ceiling().mkdir(parents=True)
    (lay.eval_ceiling() / "scores.json").write_text(json.dumps({"toy_mcq/overall": 0.9}))
    m = build_comparison(p, lay, lay.compare())["metrics"]
    assert m["proxy_ceiling/toy_mcq/overall"] == pytest.approx(0.6)
    assert m["proxy_ceiling/toy_mcq/overall/std"] == pytest.approx(0.1414, abs=1e-3)
    assert "dpa_minus_vanilla/toy_mcq/overall" in m and not any(k.startswith("proxy_ceiling_minus") for k in m)
    md = (lay.compare() / "comparison.md").read_text()
    rows = [line.split(" |")[0] for line in md.splitlines() if line.startswith("| ")]
    assert rows.index("| proxy LLM, text oracle (what PMO kept)") == rows.index("| ceiling (text oracle)") + 1
    assert "| proxy LLM, text oracle (what PMO kept) | 2 | 60.0 ± 14.1 |" in md


def test_average_only_over_benchmarks_every_arm_has(tmp_path):
    """An optional benchmark skipped for one arm leaves the average (both arms' averages are over the
    same benchmarks) and the table says so."""
    p = two_arms({"evaluate.reference_row": False})
    lay = Layout(tmp_path / "outputs")
    write_scores(lay, "dpa", 0, {"toy_mcq/overall": 0.6, "text_facts/acc": 0.4, "mmb/overall": 0.9})
    write_scores(lay, "vanilla", 0, {"toy_mcq/overall": 0.5, "text_facts/acc": 0.3})  # mmb skipped here
    m = build_comparison(p, lay, lay.compare())["metrics"]
    assert m["dpa/average"] == pytest.approx(0.5) and m["vanilla/average"] == pytest.approx(0.4)
    assert m["dpa_minus_vanilla/average"] == pytest.approx(0.1)
    md = (lay.compare() / "comparison.md").read_text()
    assert "average is over the 2 benchmark(s) every arm and seed has" in md
    assert "left out: mmb/overall (skipped, optional, for vanilla seed 0)" in md


def test_table_means_spread_and_difference(tmp_path):
    p = two_arms({"study.seeds": [0, 1], "evaluate.reference_row": False})
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
    p = two_arms()
    lay = Layout(tmp_path / "outputs")
    write_scores(lay, "dpa", 0, {"toy_mcq/overall": 0.5})
    with pytest.raises(Exception, match="no scores for arm 'vanilla' seed 0"):
        build_comparison(p, lay, lay.compare())
    assert not lay.compare().exists()


# ---- paired differences with bootstrap CIs, ceiling/reference rows, reliance ----------------------

import numpy as np

from dpa_core.evaluation.paired import PairedDifference, ci_half_width, paired_bootstrap, questions_needed, seeds_needed
from pipelines.compare import headline_keys


def write_predictions(layout: Layout, arm: str, seed: int, verdicts: list[tuple[str, bool, bool]]) -> dict:
    """predictions.jsonl of toy_mcq (category, generation correct, likelihood correct) and the matching scores."""
    d = layout.eval(arm, seed) / "toy_mcq"
    d.mkdir(parents=True)
    with open(d / "predictions.jsonl", "w") as f:
        for i, (cat, gen, lik) in enumerate(verdicts):
            f.write(json.dumps({"index": str(i), "category": cat, "prediction": "A", "extracted": "A", "answer": "A",
                                "correct": gen, "unparsed": False, "lik_choice": "A", "lik_correct": lik}) + "\n")
    scores = {"toy_mcq/overall": np.mean([v[1] for v in verdicts]), "toy_mcq/lik/overall": np.mean([v[2] for v in verdicts])}
    for cat in {v[0] for v in verdicts}:
        scores[f"toy_mcq/{cat}"] = np.mean([v[1] for v in verdicts if v[0] == cat])
        scores[f"toy_mcq/lik/{cat}"] = np.mean([v[2] for v in verdicts if v[0] == cat])
    write_scores(layout, arm, seed, {k: float(v) for k, v in scores.items()})
    return scores


def test_paired_bootstrap_basics():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(3, 400))
    same = paired_bootstrap(a, a)
    assert (same.mean, same.ci_low, same.ci_high, same.discordance) == (0.0, 0.0, 0.0, 0.0) and same.inconclusive
    always = paired_bootstrap(np.ones((2, 50)), np.zeros((2, 50)))
    assert always.ci_low == always.ci_high == 1.0 and always.verdict("dpa", "vanilla") == "dpa better"
    b = rng.integers(0, 2, size=(3, 400))
    one, two = paired_bootstrap(a, b, seed=0), paired_bootstrap(a, b, seed=0)
    assert one == two  # seeded
    assert one.ci_low < one.mean < one.ci_high and one.n_questions == 400 and one.n_seeds == 3
    # Random independent verdicts, discordance about 0.5, no seed effect: the seed part s^2 / S and the
    # question part se_q^2 are each about 0.5 / 1200, so the CI is about t * sqrt(2 * 0.5 / 1200), t near
    # 2.3 at the Welch degrees of freedom: 6.7 points (s^2 from three seeds is itself noisy).
    assert 0.045 < one.half_width < 0.095
    single = paired_bootstrap(a[:1], b[:1])  # one seed: the questions' bootstrap alone, 1.96 * sqrt(0.5 / 400)
    assert single.half_width == pytest.approx(0.069, rel=0.15)


def _verdict_grids(rng, seeds: int, questions: int, seed_sd: float):
    """Two arms with no true difference: shared question difficulty, and a training-seed effect of
    standard deviation seed_sd (in accuracy) on a - b in each seed."""
    p = rng.uniform(0.2, 0.9, size=questions)
    shift = rng.normal(0, seed_sd, size=(seeds, 1)) / 2
    return ((rng.random((seeds, questions)) < np.clip(p + shift, 0, 1)).astype(float),
            (rng.random((seeds, questions)) < np.clip(p - shift, 0, 1)).astype(float))


@pytest.mark.parametrize("seed_sd", [0.0, 0.1])
def test_paired_ci_covers_the_truth_with_three_seeds(seed_sd):
    """Coverage of the 95% CI over 300 simulated three-seed studies (1000 questions) without a true difference.
    Resampling the three seeds with replacement (the earlier CI) covered 79% at seed_sd 0.1
    (10 points); a CI that ignored the seeds would cover far less."""
    rng = np.random.default_rng(0)
    results = [paired_bootstrap(*_verdict_grids(rng, 3, 1000, seed_sd), n_resamples=200, seed=t) for t in range(300)]
    coverage = np.mean([r.ci_low <= 0.0 <= r.ci_high for r in results])
    assert 0.9 <= coverage <= 1.0
    if seed_sd == 0.0:
        # where seeds do not matter the CI stays near the questions' own width, 1.96 * sqrt(v / (3 * 1000))
        # with v the per-cell variance (about 0.3 here), times about 1.4 for s^2 counting the cell noise again
        v = np.mean([r.discordance for r in results])
        assert np.mean([r.half_width for r in results]) < 1.6 * 1.4 * 1.96 * np.sqrt(v / 3000)


def test_questions_needed_formula():
    assert questions_needed(0.5, 0.0, 0.02) == 4802  # ceil(1.96^2 / 0.02^2 * 0.5)
    assert questions_needed(0.2, 0.1, 0.02) == 1825  # variance 0.2 - 0.01 = 0.19
    assert questions_needed(0.0) == 1
    # the formula's half-width is what the bootstrap gives at that size (one seed, 10% discordant pairs)
    n = questions_needed(0.1, 0.0, 0.02)
    a = np.zeros((1, n))
    b = np.zeros((1, n))
    a[0, : n // 20], b[0, n // 20 : n // 10] = 1, 1
    assert paired_bootstrap(a, b).half_width == pytest.approx(0.02, rel=0.1)


def test_seeds_needed_is_the_ci_projected_to_more_seeds():
    # the default study's cloze DPA − Vanilla at 5e98b2f, in round figures: 3 seeds that spread by 3.5 points
    d = PairedDifference(mean=0.0, ci_low=-0.078, ci_high=0.078, n_questions=2703, n_seeds=3, discordance=0.26,
                         var_questions=0.005 ** 2, var_seed_means=0.035 ** 2)
    n = seeds_needed(d, 0.02)
    assert n is not None and 10 < n < 30
    assert ci_half_width(d.var_questions * 3 / n, d.var_seed_means, n, 2703) <= 0.02
    assert ci_half_width(d.var_questions * 3 / (n - 1), d.var_seed_means, n - 1, 2703) > 0.02  # the smallest
    assert seeds_needed(d, 0.04) < n  # a wider target needs fewer
    one = PairedDifference(mean=0.0, ci_low=-0.02, ci_high=0.02, n_questions=2703, n_seeds=1, discordance=0.26)
    assert seeds_needed(one) is None  # one seed says nothing about the seeds' spread
    assert seeds_needed(d, 0.001, max_seeds=50) is None  # out of reach
    # the projection holds: a pilot of 30 seeds pins the seeds' spread (5 points); studies with the seeds it
    # asks for then get about the half-width asked for
    rng = np.random.default_rng(0)
    pilot = paired_bootstrap(*_verdict_grids(rng, 30, 1000, 0.05), n_resamples=200)
    k = seeds_needed(pilot, 0.03)
    assert k is not None and 5 < k < 40
    halves = [paired_bootstrap(*_verdict_grids(rng, k, 1000, 0.05), n_resamples=200, seed=t).half_width
              for t in range(40)]
    assert float(np.mean(halves)) == pytest.approx(0.03, rel=0.25)


def test_headline_keys_leave_likelihood_out_of_the_average():
    keys = ["toy_mcq/overall", "toy_mcq/color", "toy_mcq/lik/overall", "toy_mcq/lik/color", "text_facts/acc"]
    assert headline_keys(keys) == ["toy_mcq/overall", "text_facts/acc"]


def test_bootstrap_verdicts_rows_and_parent_logging(tmp_path):
    p = load_params(ROOT / "params.yaml", {"study.seeds": [0, 1], "study.plain_arms": ["vanilla", "cal"]})
    lay = Layout(tmp_path / "outputs")
    rng = np.random.default_rng(0)
    n = 300
    for seed in (0, 1):
        base = rng.random(2 * n) < 0.5
        # color: dpa right everywhere, vanilla on half; shape: the very same verdicts for all arms
        write_predictions(lay, "vanilla", seed, [("color", bool(b), bool(b)) for b in base[:n]]
                          + [("shape", bool(b), bool(b)) for b in base[n:]])
        write_predictions(lay, "dpa", seed, [("color", True, bool(b)) for b in base[:n]]
                          + [("shape", bool(b), bool(b)) for b in base[n:]])
        write_predictions(lay, "cal", seed, [("color", bool(b), bool(b)) for b in base[:n]]
                          + [("shape", bool(b), bool(b)) for b in base[n:]])
    lay.eval_reference().mkdir(parents=True)
    (lay.eval_reference() / "scores.json").write_text(json.dumps({"toy_mcq/overall": 0.26, "toy_mcq/lik/overall": 0.25}))
    lay.eval_ceiling().mkdir(parents=True)
    (lay.eval_ceiling() / "scores.json").write_text(json.dumps({"toy_mcq/overall": 0.9, "toy_mcq/lik/overall": 0.95,
                                                                "meta/toy_mcq/n": 600}))
    for arm in ("dpa", "vanilla", "cal"):
        for seed in (0, 1):
            lay.reliance(arm, seed).mkdir(parents=True)
            (lay.reliance(arm, seed) / "scores.json").write_text(json.dumps(
                {"reliance/verbose/content": 0.5 + seed, "reliance/verbose/style": 0.1, "reliance/verbose/n_tokens": 9}))
    logged = []
    res = build_comparison(p, lay, lay.compare(), log_parent=lambda arm, seed, m: logged.append((arm, seed, m)))
    m = res["metrics"]
    md = res["markdown"]
    # dpa is better on color in both modes? generation only: likelihood verdicts are vanilla's
    assert m["dpa_minus_vanilla/toy_mcq/color/ci_low"] > 0 and m["dpa_minus_vanilla/toy_mcq/color/inconclusive"] == 0
    assert m["dpa_minus_vanilla/toy_mcq/shape"] == 0.0 and m["dpa_minus_vanilla/toy_mcq/shape/inconclusive"] == 1
    assert "dpa_minus_vanilla/toy_mcq/shape/questions_for_2_points" not in m  # no discordant question: no sizing
    assert m["dpa_minus_vanilla/toy_mcq/color/questions_for_2_points"] == questions_needed(
        m["dpa_minus_vanilla/toy_mcq/color/discordance"], m["dpa_minus_vanilla/toy_mcq/color"])
    # two seeds: the seeds' spread and the seeds a ±2-point CI needs at this size, in the metrics and the table
    color_pair = bootstrap_pair(collect_verdicts(p, lay), "dpa", "vanilla", "toy_mcq/color")
    assert m["dpa_minus_vanilla/toy_mcq/color/seed_sd"] == pytest.approx(color_pair.var_seed_means ** 0.5)
    sized = seeds_needed(color_pair, 0.02)
    assert sized is not None and m["dpa_minus_vanilla/toy_mcq/color/seeds_for_2_points"] == sized
    assert "seeds for ±2 (these questions)" in md and "seeds if new seeds spread alike" in md
    assert m["dpa_minus_vanilla/toy_mcq/lik/color"] == 0.0
    assert m["dpa_minus_vanilla/toy_mcq/color/n_questions"] == n
    lo, hi = m["dpa_minus_vanilla/toy_mcq/overall/ci_low"], m["dpa_minus_vanilla/toy_mcq/overall/ci_high"]
    assert lo < m["dpa_minus_vanilla/toy_mcq/overall"] < hi
    # the bootstrap's mean difference is the difference of the accuracies
    assert m["dpa_minus_vanilla/toy_mcq/overall"] == pytest.approx(m["dpa/toy_mcq/overall"] - m["vanilla/toy_mcq/overall"])
    assert m["cal_minus_vanilla/toy_mcq/overall"] == 0.0  # every non-reference arm against vanilla
    assert "| dpa − vanilla | toy_mcq/color |" in md and "dpa better" in md and "inconclusive" in md
    assert "| cal − vanilla | toy_mcq/overall |" in md
    assert "questions at the observed discordance" in md and f"over {2 * n} questions × 2 seed(s)" in md
    assert "no question was answered differently" in md  # cal − vanilla: identical verdicts
    assert "| ceiling (text oracle) | 1 | 90.0 | 90.0 |" in md and "| reference (untrained connector) | 1 | 26.0 |" in md
    assert m["ceiling/toy_mcq/lik/overall"] == 0.95
    # the average is over generation headlines only (one benchmark here): it equals toy_mcq/overall
    assert m["dpa/average"] == pytest.approx(m["dpa/toy_mcq/overall"])
    assert "## Likelihood" in md and "## Image reliance" in md
    assert m["dpa/reliance/verbose/content"] == pytest.approx(1.0) and "1.000 ± 0.707" in md
    rows = list(csv.DictReader((lay.compare() / "comparison.csv").open()))
    color = next(r for r in rows if r["arm"] == "dpa-vanilla" and r["metric"] == "toy_mcq/color")
    assert color["verdict"] == "dpa better" and int(color["n_questions"]) == n
    # the figures go onto every seed's parent run of every arm
    assert {(a, s) for a, s, _ in logged} == {(a, s) for a in ("dpa", "vanilla", "cal") for s in (0, 1)}
    dpa0 = next(f for a, s, f in logged if (a, s) == ("dpa", 0))
    assert dpa0["compare/minus_vanilla/toy_mcq/color/ci_low"] > 0
    assert dpa0.get("compare/minus_vanilla/toy_mcq/color/seeds_for_2_points") == seeds_needed(color_pair, 0.02)
    assert dpa0["compare/toy_mcq/overall/mean"] == pytest.approx(m["dpa/toy_mcq/overall"])
    assert (lay.compare() / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_cloze_is_its_own_table_with_paired_cis_and_stays_out_of_the_average(tmp_path):
    p = two_arms({"evaluate.reference_row": False})
    lay = Layout(tmp_path / "outputs")
    n = 200
    for arm, cloze_right in (("vanilla", lambda i: i % 2 == 0), ("dpa", lambda i: True)):
        d = lay.eval(arm, 0) / "toy_mcq"
        d.mkdir(parents=True)
        with open(d / "predictions.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"index": str(i), "category": "color", "prediction": "A", "extracted": "A",
                                    "answer": "A", "correct": i % 2 == 0, "unparsed": False,
                                    "cloze_choice": "A", "cloze_correct": cloze_right(i)}) + "\n")
        cloze = sum(cloze_right(i) for i in range(n)) / n
        write_scores(lay, arm, 0, {"toy_mcq/overall": 0.5, "toy_mcq/color": 0.5,
                                   "toy_mcq/cloze/overall": cloze, "toy_mcq/cloze/color": cloze})
    assert headline_keys(["toy_mcq/overall", "toy_mcq/cloze/overall"]) == ["toy_mcq/overall"]
    res = build_comparison(p, lay, lay.compare())
    m, md = res["metrics"], res["markdown"]
    assert "## Cloze" in md and "| dpa − vanilla | toy_mcq/cloze/overall | +50.0 |" in md
    assert m["dpa_minus_vanilla/toy_mcq/cloze/overall/inconclusive"] == 0 and m["dpa_minus_vanilla/toy_mcq/cloze/overall/ci_low"] > 0.4
    assert m["dpa_minus_vanilla/toy_mcq/overall/inconclusive"] == 1  # same generation verdicts
    assert m["dpa/average"] == pytest.approx(0.5)  # generation headline only
    assert "dpa − vanilla on toy_mcq/cloze/overall: dpa better" in md


@pytest.mark.parametrize("control_right, says", [
    (lambda i, v: v, "is not distinguishable from vanilla (CI covers 0): vanilla's alignment brings no"),
    (lambda i, v: v and i % 2 == 0, "scores below vanilla: alignment pays here"),
])
def test_the_no_alignment_control_says_whether_the_study_sees_alignment(tmp_path, control_right, says):
    p = load_params(ROOT / "params.yaml", {"study.plain_arms": ["vanilla", "no_align"], "evaluate.reference_row": False})
    lay = Layout(tmp_path / "outputs")
    vanilla = np.random.default_rng(0).random(600) < 0.6
    write_predictions(lay, "vanilla", 0, [("color", bool(v), bool(v)) for v in vanilla])
    write_predictions(lay, "dpa", 0, [("color", bool(v), bool(v)) for v in vanilla])
    write_predictions(lay, "no_align", 0, [("color", bool(control_right(i, v)), bool(v)) for i, v in enumerate(vanilla)])
    md = build_comparison(p, lay, lay.compare())["markdown"]
    assert f"- Control, toy_mcq/overall: no_align (no alignment) {says}" in md
    assert "no_align (proxy=False, loss=vanilla, no alignment)" in md
    assert "Control, toy_mcq/overall: dpa" not in md  # only arms without alignment are controls
