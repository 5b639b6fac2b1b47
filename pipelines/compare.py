"""The study's answer: every arm's scores per benchmark and category, mean and spread over seeds,
and DPA minus Vanilla. Written as markdown, CSV, DVC metrics/plots and a PNG chart."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from dpa_core.errors import DPAInputError
from dpa_core.io import atomic_dir, read_json, write_json_atomic, write_text_atomic

AVERAGE = "average"


def headline_keys(keys) -> list[str]:
    """One score per benchmark: its overall accuracy (builtin/vlmeval) or its accuracy (lm-eval)."""
    keys = sorted(keys)
    heads = [k for k in keys if k.endswith("/overall")]
    covered = {k.rsplit("/", 1)[0] for k in heads}
    heads += [k for k in keys if k.endswith("/acc") and k.rsplit("/", 1)[0] not in covered]
    return heads or keys


def numeric_scores(path: Path) -> dict[str, float]:
    data = read_json(path)
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("meta/")}


def collect(p, layout) -> dict[str, dict[int, dict[str, float]]]:
    """{arm: {seed: {metric: value}}}, the reference row under 'reference' (seed 0)."""
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
            rows["reference"] = {0: scores}
    return rows


def summarise(rows: dict) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """Metric columns and {arm: {metric: (mean, std, n)}} with an 'average' of the headline scores."""
    metrics = sorted({k for seeds in rows.values() for s in seeds.values() for k in s})
    heads = headline_keys(metrics)
    table = {}
    for arm, seeds in rows.items():
        per_seed = [dict(s, **{AVERAGE: statistics.fmean(s[k] for k in heads if k in s)}) for s in seeds.values()]
        table[arm] = {}
        for m in [AVERAGE, *metrics]:
            vals = [s[m] for s in per_seed if m in s]
            if vals:
                table[arm][m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return [AVERAGE, *metrics], table


def paired_difference(rows: dict, a: str, b: str, metric_fn) -> tuple[float, float, int] | None:
    seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
    if not seeds:
        return None
    diffs = [metric_fn(rows[a][s]) - metric_fn(rows[b][s]) for s in seeds]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


def _fmt(cell) -> str:
    if cell is None:
        return "–"
    mean, std, n = cell
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")


def build_comparison(p, layout, out_dir: Path) -> dict:
    rows = collect(p, layout)
    columns, table = summarise(rows)
    heads = headline_keys([c for c in columns if c != AVERAGE])
    arms = list(table)
    diff_rows = {}
    if "dpa" in rows and "vanilla" in rows:
        for m in columns:
            fn = (lambda s: statistics.fmean(s[k] for k in heads if k in s)) if m == AVERAGE else (lambda s, m=m: s.get(m, math.nan))
            diff_rows[m] = paired_difference(rows, "dpa", "vanilla", fn)

    # Markdown: scores in percent, mean ± std over seeds.
    md = io.StringIO()
    n_seeds = {arm: max(c[2] for c in table[arm].values()) for arm in arms}
    md.write(f"# DPA study: {p.profile} profile\n\nScores in %, mean ± std over seeds.\n\n")
    md.write("| arm | seeds | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2) + "\n")
    for arm in arms:
        md.write(f"| {arm} | {n_seeds[arm]} | " + " | ".join(_fmt(table[arm].get(m)) for m in columns) + " |\n")
    if diff_rows:
        md.write("| **dpa − vanilla** | " + str(max(d[2] for d in diff_rows.values() if d)) + " | "
                 + " | ".join(_fmt(diff_rows[m]) for m in columns) + " |\n")
    md.write("\nArms: " + ", ".join(f"{a} (proxy={p.arms[a].proxy}, loss={p.arms[a].loss})"
                                     for a in arms if a in p.arms) + ".\n")

    # CSV (long and wide enough for any tool) and DVC metrics.
    csv_buf = io.StringIO()
    w = csv.writer(csv_buf)
    w.writerow(["arm", "metric", "mean", "std", "n_seeds"])
    for arm in arms:
        for m in columns:
            if m in table[arm]:
                w.writerow([arm, m, *table[arm][m]])
    for m, d in diff_rows.items():
        if d:
            w.writerow(["dpa-vanilla", m, *d])
    metrics = {f"{arm}/{m}": table[arm][m][0] for arm in arms for m in columns if m in table[arm]}
    metrics |= {f"dpa_minus_vanilla/{m}": d[0] for m, d in diff_rows.items() if d}
    plot_rows = [{"arm": arm, "metric": m, "score": table[arm][m][0]} for arm in arms for m in columns if m in table[arm]]

    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "comparison.md", md.getvalue())
        write_text_atomic(tmp / "comparison.csv", csv_buf.getvalue())
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "plot.json", plot_rows)
        chart(table, columns, tmp / "comparison.png", f"DPA study ({p.profile})")
    print(md.getvalue(), flush=True)
    return {"metrics": metrics, "markdown": md.getvalue(), "plot": plot_rows}


def chart(table: dict, columns: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) + 2), 4.2), dpi=120)
    colours = {"dpa": "#1f77b4", "vanilla": "#ff7f0e", "reference": "#9e9e9e"}
    for i, arm in enumerate(arms):
        xs = [c + (i - (len(arms) - 1) / 2) * width for c in range(len(columns))]
        means = [100 * table[arm].get(m, (math.nan, 0, 0))[0] for m in columns]
        stds = [100 * table[arm].get(m, (0, 0.0, 0))[1] for m in columns]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=arm, color=colours.get(arm))
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
