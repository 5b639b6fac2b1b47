"""The study's answer: every arm's scores per benchmark and category (generation and likelihood
scoring), mean and spread over seeds, each arm against Vanilla as a paired difference with a 95%
CI over questions (bootstrap) and seeds (Student's t), the reference and text-oracle ceiling rows, and the
image-reliance diagnostic. Written as markdown, CSV, DVC metrics/plots and a PNG chart."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np

from dpa_core.errors import DPAInputError
from dpa_core.evaluation.flat_metrics import (CLOZE, LIKELIHOOD, category_key, is_likelihood_key, likelihood_key,
                                              metric_part, scoring_mode)
from dpa_core.evaluation.paired import PairedDifference, paired_bootstrap, questions_needed, seeds_needed
from dpa_core.io import atomic_dir, read_json, write_json_atomic, write_text_atomic

AVERAGE = "average"
BASELINE = "vanilla"
REFERENCE, CEILING, PROXY_CEILING = "reference", "ceiling", "proxy_ceiling"
LABELS = {REFERENCE: "reference (untrained connector)", CEILING: "ceiling (text oracle)",
          PROXY_CEILING: "proxy LLM, text oracle (what PMO kept)"}
N_RESAMPLES, BOOTSTRAP_SEED = 2000, 0
TARGET_HALF_WIDTH = 0.02  # the CI half-width the question count is sized for (2 points)


def headline_keys(keys) -> list[str]:
    """One score per benchmark: its overall accuracy (builtin/vlmeval) or its accuracy (lm-eval).
    Likelihood-scored overalls ("<name>/lik/overall") are a second view of the same benchmark, not
    another benchmark: they never enter the average."""
    keys = sorted(k for k in keys if not is_likelihood_key(k))
    heads = [k for k in keys if k.endswith("/overall")]
    covered = {k.rsplit("/", 1)[0] for k in heads}
    heads += [k for k in keys if k.endswith("/acc") and k.rsplit("/", 1)[0] not in covered]
    return heads or keys


def numeric_scores(path: Path) -> dict[str, float]:
    data = read_json(path)
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("meta/")}


def collect(p, layout) -> dict[str, dict[int, dict[str, float]]]:
    """{arm: {seed: {metric: value}}}; the reference and ceiling rows under 'reference' and 'ceiling' (seed 0),
    and the proxy LLM's text oracle (the diagnose stage, one per seed) under 'proxy_ceiling'."""
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for arm in p.study.arms:
        for seed in p.study.seeds:
            f = layout.eval(arm, seed) / "scores.json"
            if not f.is_file():
                raise DPAInputError(f"no scores for arm {arm!r} seed {seed}.", file=f,
                                    fix="run the evaluate stage for every arm and seed (dvc repro does).")
            rows.setdefault(arm, {})[seed] = numeric_scores(f)
    ref = layout.eval_reference() / "scores.json"
    if p.evaluate.reference_row and ref.is_file():
        scores = numeric_scores(ref)
        if scores.pop("enabled", 1):
            rows[REFERENCE] = {0: scores}
    ceiling = layout.eval_ceiling() / "scores.json"
    if p.evaluate.reference_row and ceiling.is_file():
        rows[CEILING] = {0: numeric_scores(ceiling)}
    # What the proxy stage kept of the base LLM's reading, where the diagnose stage asked it.
    proxy = {s: scores for s in p.study.seeds
             if (f := layout.diagnose(s) / "scores.json").is_file() and (scores := numeric_scores(f))}
    if proxy and CEILING in rows:
        rows[PROXY_CEILING] = proxy
    return rows


def _column_order(key: str) -> tuple:
    """Per benchmark: generation, then likelihood, then cloze; the overall score before the categories."""
    return key.split("/", 1)[0], (None, LIKELIHOOD, CLOZE).index(scoring_mode(key)), not key.endswith("/overall"), key


def common_headlines(rows: dict, arms: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The headline scores every seed of every trained arm has (what the average is taken over), and
    the others with the runs that lack them (an optional benchmark skipped somewhere)."""
    runs = [(arm, seed, s) for arm in arms if arm in rows for seed, s in rows[arm].items()]
    heads = headline_keys({k for _, _, s in runs for k in s})
    common = [k for k in heads if all(k in s for _, _, s in runs)]
    missing = {k: [f"{arm} seed {seed}" for arm, seed, s in runs if k not in s] for k in heads if k not in common}
    return common, missing


def summarise(rows: dict, heads: list[str] | None = None) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """Metric columns and {arm: {metric: (mean, std, n)}} with an 'average' of the headline scores
    `heads` (default: every headline score) for rows that have all of them."""
    metrics = sorted({k for seeds in rows.values() for s in seeds.values() for k in s}, key=_column_order)
    heads = headline_keys(metrics) if heads is None else heads
    table = {}
    for arm, seeds in rows.items():
        per_seed = []
        for s in seeds.values():
            # Only over the same benchmarks for every row: the ceiling, for one, has no text benchmarks.
            complete = bool(heads) and all(k in s for k in heads)
            per_seed.append(dict(s, **({AVERAGE: statistics.fmean(s[k] for k in heads)} if complete else {})))
        table[arm] = {}
        for m in [AVERAGE, *metrics]:
            vals = [s[m] for s in per_seed if m in s]
            if vals:
                table[arm][m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return [AVERAGE, *metrics], table


def paired_difference(rows: dict, a: str, b: str, metric_fn) -> tuple[float, float, int] | None:
    """Mean and std over seeds of a - b (the fallback where per-question verdicts are missing)."""
    seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
    if not seeds:
        return None
    diffs = [metric_fn(rows[a][s]) - metric_fn(rows[b][s]) for s in seeds]
    if any(math.isnan(d) for d in diffs):
        return None
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


def alignment_sensitivity(control: str, diff) -> str:
    """One sentence on control − baseline, where the control skipped alignment: whether the
    baseline's alignment pays at all here (DPA's proxy acts through alignment)."""
    if diff.inconclusive:
        return (f"{control} (no alignment) is not distinguishable from {BASELINE} (CI covers 0): {BASELINE}'s "
                "alignment brings no measurable gain over none at this size, so the study has no evidence "
                "that a better alignment pays here.")
    if diff.ci_high < 0:
        return f"{control} (no alignment) scores below {BASELINE}: alignment pays here, so the study can see it."
    return (f"{control} (no alignment) scores above {BASELINE}: alignment as trained here costs accuracy, "
            "and the finetune alone does better.")


# ---- per-question verdicts and the bootstrap ----------------------------------------------------

def read_verdicts(path: Path) -> dict[str, dict[str, tuple[str, bool]]]:
    """{metric key: {question index: (category, correct)}} from a built-in benchmark's predictions.jsonl,
    for the generation keys ("<name>/overall", "<name>/<category>") and, where scored, the likelihood
    and cloze keys."""
    name = path.parent.name
    gen: dict[str, tuple[str, bool]] = {}
    lik: dict[str, tuple[str, bool]] = {}
    cloze: dict[str, tuple[str, bool]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            gen[str(rec["index"])] = (str(rec["category"]), bool(rec["correct"]))
            if rec.get("lik_correct") is not None:
                lik[str(rec["index"])] = (str(rec["category"]), bool(rec["lik_correct"]))
            if rec.get("cloze_correct") is not None:
                cloze[str(rec["index"])] = (str(rec["category"]), bool(rec["cloze_correct"]))
        except (json.JSONDecodeError, KeyError) as err:
            raise DPAInputError(f"line {n} is not a prediction record ({err!r}).", file=path, record=n,
                                fix="rerun the evaluate stage; predictions.jsonl is written by the built-in scorer.")
    out: dict[str, dict[str, tuple[str, bool]]] = {}
    for verdicts, key_of in ((gen, lambda c: category_key(name, c) if c else f"{metric_part(name)}/overall"),
                             (lik, lambda c: likelihood_key(name, c)),
                             (cloze, lambda c: likelihood_key(name, c, CLOZE))):
        if verdicts:
            out[key_of(None)] = verdicts
            for cat in sorted({c for c, _ in verdicts.values()}):
                out[key_of(cat)] = {i: v for i, v in verdicts.items() if v[0] == cat}
    return out


def collect_verdicts(p, layout) -> dict[str, dict[int, dict[str, dict[str, tuple[str, bool]]]]]:
    """{arm: {seed: {metric: {question: (category, correct)}}}} for every built-in TSV benchmark found."""
    names = [b.name for b in p.evaluate.benchmarks if b.kind == "builtin_tsv"]
    out: dict = {}
    for arm in p.study.arms:
        for seed in p.study.seeds:
            for name in names:
                f = layout.eval(arm, seed) / name / "predictions.jsonl"
                if f.is_file():
                    out.setdefault(arm, {}).setdefault(seed, {}).update(read_verdicts(f))
    return out


def bootstrap_pair(verdicts: dict, a: str, b: str, metric: str) -> PairedDifference | None:
    """a - b on `metric` over the seeds both have, paired on question and seed."""
    seeds = sorted(s for s in set(verdicts.get(a, {})) & set(verdicts.get(b, {}))
                   if metric in verdicts[a][s] and metric in verdicts[b][s])
    if not seeds:
        return None
    questions = sorted(set.intersection(*[set(verdicts[x][s][metric]) for x in (a, b) for s in seeds]))
    if not questions:
        return None
    grid = {x: np.array([[verdicts[x][s][metric][q][1] for q in questions] for s in seeds]) for x in (a, b)}
    return paired_bootstrap(grid[a], grid[b], n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)


# ---- rendering ----------------------------------------------------------------------------------

MAX_SEEDS = 1000  # beyond this, "more than": the seeds' spread swamps any study


def seed_sizes(boots: dict[str, dict[str, PairedDifference]]) -> dict[tuple[str, str], int | None]:
    """(arm, metric) -> seeds for the target half-width at this benchmark size (None: more than MAX_SEEDS), for
    the pairs with several seeds and a discordant question (the others have no spread to size by)."""
    return {(arm, m): seeds_needed(b, TARGET_HALF_WIDTH, MAX_SEEDS) for arm, per in boots.items()
            for m, b in per.items() if b.var_seed_means is not None and b.discordance}


def _seeds_cell(sizes: dict, arm: str, m: str) -> str:
    if (arm, m) not in sizes:
        return "–"
    return str(sizes[arm, m]) if sizes[arm, m] is not None else f"> {MAX_SEEDS}"


def _seed_sizing(sizes: dict, arm: str, m: str, b: PairedDifference) -> str:
    """With several seeds: their spread, and how many seeds it takes to a ±2-point CI at this size."""
    if (arm, m) not in sizes:
        return ""
    return (f"; the per-seed differences spread by {100 * b.var_seed_means ** 0.5:.1f} points (sd), and at "
            f"{b.n_questions} questions a half-width ≤ {100 * TARGET_HALF_WIDTH:.0f} points needs about "
            f"{_seeds_cell(sizes, arm, m)} seeds if new seeds spread alike")


def label(arm: str) -> str:
    return LABELS.get(arm, arm)


def _fmt(cell) -> str:
    if cell is None:
        return "–"
    mean, std, n = cell
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")


def _fmt_diff(seedwise, boot: PairedDifference | None) -> str:
    if boot is not None:
        return f"{100 * boot.mean:+.1f} [{100 * boot.ci_low:+.1f}, {100 * boot.ci_high:+.1f}]"
    if seedwise is None:
        return "–"
    mean, std, n = seedwise
    return f"{100 * mean:+.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")


def _table(md: io.StringIO, title: str, columns: list[str], table: dict, arms: list[str], n_seeds: dict,
           diffs: dict, boots: dict) -> None:
    if not columns:
        return
    md.write(f"## {title}\n\n")
    md.write("| arm | seeds | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2) + "\n")
    for arm in arms:
        md.write(f"| {label(arm)} | {n_seeds[arm]} | " + " | ".join(_fmt(table[arm].get(m)) for m in columns) + " |\n")
    for arm, per_metric in diffs.items():
        cells = [_fmt_diff(per_metric.get(m), boots.get(arm, {}).get(m)) for m in columns]
        n = max((d[2] for d in per_metric.values() if d), default=0)
        md.write(f"| **{arm} − {BASELINE}** | {n} | " + " | ".join(cells) + " |\n")
    md.write("\n")


def reliance_rows(p, layout) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{arm: {metric: (mean, std, n seeds)}} from the reliance stage's scores, where present."""
    out = {}
    for arm in p.study.arms:
        per_seed = [numeric_scores(f) for s in p.study.seeds if (f := layout.reliance(arm, s) / "scores.json").is_file()]
        if not per_seed:
            continue
        keys = sorted({k for s in per_seed for k in s})
        out[arm] = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for k in keys if (v := [s[k] for s in per_seed if k in s])}
    return out


def _reliance_table(md: io.StringIO, rel: dict) -> list[str]:
    keys = sorted({k for r in rel.values() for k in r if "/n_" not in k},
                  key=lambda k: (k.startswith("reliance/text_oracle/"), k))
    if not keys:
        return []
    arms = list(rel)
    md.write("## Image reliance after alignment\n\nMean over held-out caption tokens of log p(token | image, prefix) − "
             "log p(token | prefix), in nats (mean ± std over seeds), with the LLM each connector was aligned "
             "against; content = tokens of content words (colours, shapes, positions, counts, relations; "
             "content/<class> per class), style = all other tokens. text_oracle rows: the same with the scene "
             "given as the LLM's own words in place of the image: does the frozen LLM copy what its context "
             "says into a caption at all (a reference point, not a bound).\n\n")
    md.write("| measure | " + " | ".join(arms) + " |\n|" + "---|" * (len(arms) + 1) + "\n")
    for k in keys:
        cells = [(f"{rel[a][k][0]:.3f}" + (f" ± {rel[a][k][1]:.3f}" if rel[a][k][2] > 1 else "")) if k in rel[a] else "–"
                 for a in arms]
        md.write(f"| {k.removeprefix('reliance/')} | " + " | ".join(cells) + " |\n")
    md.write("\n")
    return keys


def build_comparison(p, layout, out_dir: Path, log_parent=None) -> dict:
    """Write the comparison into out_dir. `log_parent(arm, seed, metrics)`, when given, logs each arm's
    summary figures onto that arm's MLflow parent run for every seed."""
    rows = collect(p, layout)
    heads, left_out = common_headlines(rows, p.study.arms)
    columns, table = summarise(rows, heads)
    arms = list(table)
    n_seeds = {arm: max(c[2] for c in table[arm].values()) for arm in arms}
    verdicts = collect_verdicts(p, layout)

    # Every trained arm against Vanilla: the seed-wise paired difference and, where per-question
    # verdicts exist, the CI over questions (bootstrap) and seeds (Student's t).
    others = [a for a in p.study.arms if a != BASELINE and a in rows] if BASELINE in rows else []
    diffs: dict[str, dict] = {}
    boots: dict[str, dict[str, PairedDifference]] = {}
    for arm in others:
        diffs[arm] = {}
        for m in columns:
            fn = (lambda s: statistics.fmean([s[k] for k in heads if k in s] or [math.nan])) if m == AVERAGE \
                else (lambda s, m=m: s.get(m, math.nan))
            diffs[arm][m] = paired_difference(rows, arm, BASELINE, fn)
        boots[arm] = {m: b for m in columns if (b := bootstrap_pair(verdicts, arm, BASELINE, m)) is not None}
    sizes = seed_sizes(boots)

    gen_columns = [c for c in columns if scoring_mode(c) is None]
    lik_columns = [c for c in columns if scoring_mode(c) == LIKELIHOOD]
    cloze_columns = [c for c in columns if scoring_mode(c) == CLOZE]
    md = io.StringIO()
    md.write(f"# DPA study: {p.profile} profile\n\nScores in %, mean ± std over seeds. "
             f"Differences: mean [95% CI: questions bootstrapped ({N_RESAMPLES} resamples); with several seeds, "
             "the seeds' spread by Student's t].\n\n")
    _table(md, "Generation (greedy reply, option extracted)", gen_columns, table, arms, n_seeds, diffs, boots)
    _table(md, "Likelihood (highest option-letter log-probability)", lik_columns, table, arms, n_seeds, diffs, boots)
    _table(md, "Cloze (plain question; the option whose full answer is most likely, no letters)", cloze_columns,
           table, arms, n_seeds, diffs, boots)
    if left_out:
        md.write(f"**The average is over the {len(heads)} benchmark(s) every arm and seed has** "
                 f"({', '.join(heads) or 'none'}); left out: "
                 + "; ".join(f"{k} (skipped, optional, for {', '.join(runs)})" for k, runs in left_out.items())
                 + ".\n\n")

    # The paired differences, one line per benchmark metric, with the verdict and the sizing figures.
    stat_rows = []
    if boots:
        md.write(f"## Paired differences against {BASELINE}\n\n")
        md.write("| pair | metric | difference | 95% CI | verdict | CI half-width | questions × seeds | discordant "
                 f"| questions for ±{100 * TARGET_HALF_WIDTH:.0f} (one seed) "
                 f"| seeds for ±{100 * TARGET_HALF_WIDTH:.0f} (these questions) |\n|" + "---|" * 10 + "\n")
        for arm, per_metric in boots.items():
            for m, b in per_metric.items():
                # With no discordant question there is nothing to size the benchmark by.
                need = questions_needed(b.discordance, b.mean, TARGET_HALF_WIDTH) if b.discordance else None
                stat_rows.append((arm, m, b, need))
                md.write(f"| {arm} − {BASELINE} | {m} | {100 * b.mean:+.1f} | [{100 * b.ci_low:+.1f}, "
                         f"{100 * b.ci_high:+.1f}] | {b.verdict(arm, BASELINE)} | {100 * b.half_width:.1f} | "
                         f"{b.n_questions} × {b.n_seeds} | {100 * b.discordance:.1f}% | {need or '–'} "
                         f"| {_seeds_cell(sizes, arm, m)} |\n")
        # The headline of every scoring mode: a benchmark's overall score by generation, letters, cloze.
        head = [(arm, m, b, need) for arm, m, b, need in stat_rows if m in heads or
                (scoring_mode(m) is not None and m.endswith("/overall"))]
        for arm, m, b, need in head:
            sizing = (f"a half-width ≤ {100 * TARGET_HALF_WIDTH:.0f} points at one seed needs about {need} questions "
                      f"at the observed discordance ({100 * b.discordance:.1f}%)" if need else
                      "no question was answered differently by the two arms, so the discordance that sizes the "
                      "benchmark is unknown")
            md.write(f"\n- {arm} − {BASELINE} on {m}: {b.verdict(arm, BASELINE)}; CI half-width "
                     f"{100 * b.half_width:.1f} points over {b.n_questions} questions × {b.n_seeds} seed(s); {sizing}"
                     f"{_seed_sizing(sizes, arm, m, b)}.")
        md.write("\n\n")
        # What the no-alignment control says about the study itself.
        control = [f"- Control, {m}: {alignment_sensitivity(arm, b)}\n" for arm, m, b, _ in head
                   if arm in p.arms and not p.arms[arm].align]
        md.write("".join(control) + ("\n" if control else ""))

    rel = reliance_rows(p, layout)
    rel_keys = _reliance_table(md, rel)
    md.write("Arms: " + ", ".join(f"{a} (proxy={p.arms[a].proxy}, loss={p.arms[a].loss}"
                                  + (", no alignment)" if not p.arms[a].align else ")")
                                  for a in arms if a in p.arms) + ".\n")

    # CSV (long form) and DVC metrics.
    csv_buf = io.StringIO()
    w = csv.writer(csv_buf)
    w.writerow(["arm", "metric", "mean", "std", "n_seeds", "ci_low", "ci_high", "verdict", "n_questions"])
    for arm in arms:
        for m in columns:
            if m in table[arm]:
                w.writerow([arm, m, *table[arm][m], "", "", "", ""])
    for arm, per_metric in diffs.items():
        for m, d in per_metric.items():
            b = boots[arm].get(m)
            if b is not None:
                w.writerow([f"{arm}-{BASELINE}", m, b.mean, "", b.n_seeds, b.ci_low, b.ci_high,
                            b.verdict(arm, BASELINE), b.n_questions])
            elif d:
                w.writerow([f"{arm}-{BASELINE}", m, *d, "", "", "", ""])
    for arm, r in rel.items():
        for k, cell in r.items():
            w.writerow([arm, k, *cell, "", "", "", ""])

    metrics = {f"{arm}/{m}": table[arm][m][0] for arm in arms for m in columns if m in table[arm]}
    metrics |= {f"{arm}/{m}/std": table[arm][m][1] for arm in arms for m in columns
                if m in table[arm] and table[arm][m][2] > 1}
    for arm in others:
        key = f"{arm}_minus_{BASELINE}"
        metrics |= {f"{key}/{m}": d[0] for m, d in diffs[arm].items() if d}
        for m, b in boots[arm].items():
            metrics |= {f"{key}/{m}": b.mean, f"{key}/{m}/ci_low": b.ci_low, f"{key}/{m}/ci_high": b.ci_high,
                        f"{key}/{m}/inconclusive": int(b.inconclusive), f"{key}/{m}/n_questions": b.n_questions,
                        f"{key}/{m}/discordance": b.discordance}
            if b.discordance:
                metrics[f"{key}/{m}/questions_for_2_points"] = questions_needed(b.discordance, b.mean, TARGET_HALF_WIDTH)
                if (arm, m) in sizes:
                    metrics[f"{key}/{m}/seed_sd"] = b.var_seed_means ** 0.5
                    if sizes[arm, m] is not None:
                        metrics[f"{key}/{m}/seeds_for_2_points"] = sizes[arm, m]
    metrics |= {f"{arm}/{k}": cell[0] for arm, r in rel.items() for k, cell in r.items()}
    plot_rows = [{"arm": label(arm), "metric": m, "score": table[arm][m][0]} for arm in arms for m in columns
                 if m in table[arm]]

    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "comparison.md", md.getvalue())
        write_text_atomic(tmp / "comparison.csv", csv_buf.getvalue())
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "plot.json", plot_rows)
        chart(table, [*gen_columns, *lik_columns, *cloze_columns], boots, tmp / "comparison.png", f"DPA study ({p.profile})")
    print(md.getvalue(), flush=True)

    if log_parent is not None:
        for arm in p.study.arms:
            figures = {f"compare/{m}/mean": table[arm][m][0] for m in columns if m in table.get(arm, {})}
            figures |= {f"compare/{m}/std": table[arm][m][1] for m in columns if m in table.get(arm, {})}
            for m, b in boots.get(arm, {}).items():
                figures |= {f"compare/minus_{BASELINE}/{m}/diff": b.mean, f"compare/minus_{BASELINE}/{m}/ci_low": b.ci_low,
                            f"compare/minus_{BASELINE}/{m}/ci_high": b.ci_high,
                            f"compare/minus_{BASELINE}/{m}/inconclusive": int(b.inconclusive)}
                if sizes.get((arm, m)) is not None:
                    figures[f"compare/minus_{BASELINE}/{m}/seeds_for_2_points"] = sizes[arm, m]
            figures |= {f"compare/{k}/mean": cell[0] for k, cell in rel.get(arm, {}).items()}
            for seed in p.study.seeds:
                log_parent(arm, seed, figures)
    return {"metrics": metrics, "markdown": md.getvalue(), "plot": plot_rows, "reliance_keys": rel_keys}


def chart(table: dict, columns: list[str], boots: dict, path: Path, title: str) -> None:
    """Scores per arm (error bars: std over seeds) and, below, each arm minus Vanilla (error bars: 95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    pairs = [(arm, m, b) for arm, per in boots.items() for m, b in per.items() if m in columns]
    n_panels = 2 if pairs else 1
    fig, axes = plt.subplots(n_panels, 1, figsize=(max(7, 0.9 * len(columns) + 2), 4.2 * n_panels), dpi=120,
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(arms), 1)
    fixed = {"dpa": "#1f77b4", BASELINE: "#ff7f0e", REFERENCE: "#9e9e9e", CEILING: "#2ca02c",
             PROXY_CEILING: "#98df8a"}
    spare = iter(["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"] * 4)
    colours = {arm: fixed.get(arm) or next(spare) for arm in arms}
    for i, arm in enumerate(arms):
        xs = [c + (i - (len(arms) - 1) / 2) * width for c in range(len(columns))]
        means = [100 * table[arm].get(m, (math.nan, 0, 0))[0] for m in columns]
        stds = [100 * table[arm].get(m, (0, 0.0, 0))[1] for m in columns]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label(arm), color=colours[arm])
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (%), ± std over seeds")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if pairs:
        ax = axes[1][0]
        others = list(boots)
        width = 0.8 / max(len(others), 1)
        for i, arm in enumerate(others):
            per = boots[arm]
            idx = [c for c, m in enumerate(columns) if m in per]
            xs = [c + (i - (len(others) - 1) / 2) * width for c in idx]
            mean = np.array([100 * per[columns[c]].mean for c in idx])
            low = np.array([100 * per[columns[c]].ci_low for c in idx])
            high = np.array([100 * per[columns[c]].ci_high for c in idx])
            ax.errorbar(xs, mean, yerr=[mean - low, high - mean], fmt="o", capsize=3, label=f"{arm} − {BASELINE}",
                        color=colours[arm])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("difference (points), 95% CI")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
