"""The conflict dial as an experiment: DPA − Vanilla (with its 95% CI) against the measured
language-prior gap, over a sweep of the world's `verbose_style` (0 plain … 1 full florid register).

Each point is one DVC experiment, `dvc exp run -S world.verbose_style=V` (so `dvc exp show` lists
them with their params and metrics); after each, the point is read from that run's outputs:

- x: the base LLM's log-perplexity on the verbose captions minus on its own style (nats per
  token; `diagnose` and the world's prior-gap metrics): how far the caption register is from the
  LLM's prior. It is measured, not the dial's value.
- y: `<arm>_minus_vanilla/<metric>` with ci_low / ci_high from `compare`.

    dpa sweep conflict --values 0,0.5,1 [-S study.seeds=[0,1,2] ...]

writes outputs/sweep/conflict.{json,md,png}. params.yaml is restored afterwards (the workspace's
outputs then belong to the last point; `dvc repro` brings back the restored setting's).
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

from dpa_core.errors import DPAInputError
from dpa_core.io import read_json, write_json_atomic, write_text_atomic

# Cloze first: at toy scale it is the scoring mode that reads above chance (docs/toyworld.md).
METRICS = ("toy_mcq/cloze/overall", "toy_mcq/lik/overall", "toy_mcq/overall")


def parse_values(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DPAInputError(f"--values wants numbers separated by commas, got {text!r}.", fix="e.g. --values 0,0.5,1") from None
    if len(values) < 2 or any(not 0.0 <= v <= 1.0 for v in values):
        raise DPAInputError(f"--values needs at least two dial settings in 0..1, got {text!r}.", fix="e.g. --values 0,0.5,1")
    return values


def read_point(outputs: Path, value: float, arm: str = "dpa") -> dict:
    """One sweep point from a finished run's outputs."""
    compare = outputs / "compare" / "metrics.json"
    world = outputs / "metrics" / "world.json"
    diagnose = sorted((outputs / "metrics").glob("diagnose-seed*.json"))
    for f in (compare, world, *diagnose[:1]):
        if not f.is_file():
            raise DPAInputError(f"sweep point {value}: {f} is missing.", file=f, fix="the run did not finish; see dvc's output above.")
    if not diagnose:
        raise DPAInputError(f"sweep point {value}: no diagnose metrics in {outputs / 'metrics'}.",
                            fix="the sweep needs a proxy arm (study.proxy_arms), which runs the diagnose stage.")
    w = read_json(world)
    own = w.get("prior_gap/ppl.own_style", w.get("prior_gap/ppl/own_style"))
    verbose = [read_json(f).get("ppl/base/verbose") for f in diagnose]
    if own is None or None in verbose:
        raise DPAInputError(f"sweep point {value}: no perplexity of the own style or of the verbose captions.",
                            file=diagnose[0], fix="keep a caption source named 'verbose' in data.captions.")
    m = read_json(compare)
    point = {"verbose_style": value, "prior_gap_nats": math.log(sum(verbose) / len(verbose)) - math.log(own)}
    for metric in METRICS:
        key = f"{arm}_minus_vanilla/{metric}"
        if key in m:
            point[metric] = {"diff": m[key], "ci_low": m.get(f"{key}/ci_low"), "ci_high": m.get(f"{key}/ci_high"),
                             "inconclusive": m.get(f"{key}/inconclusive"),
                             "dpa": m.get(f"{arm}/{metric}"), "vanilla": m.get(f"vanilla/{metric}")}
    return point


def run_conflict_sweep(values: list[float], sets: list[str], outputs: Path = Path("outputs"),
                       params: Path = Path("params.yaml")) -> dict:
    saved = params.read_text(encoding="utf-8")
    points = []
    try:
        for v in values:
            cmd = ["dvc", "exp", "run", "-S", f"world.verbose_style={v}", *[a for s in sets for a in ("-S", s)]]
            print("[dpa sweep]", " ".join(cmd), flush=True)
            if subprocess.call(cmd) != 0:
                raise DPAInputError(f"the sweep point verbose_style={v} failed (`{' '.join(cmd)}`).",
                                    fix="see dvc's output above; finished points are in `dvc exp show`.")
            points.append(read_point(outputs, v))
    finally:
        params.write_text(saved, encoding="utf-8")
    result = {"dial": "world.verbose_style", "x": "prior_gap_nats", "points": points}
    out = outputs / "sweep"
    write_json_atomic(out / "conflict.json", result)
    write_text_atomic(out / "conflict.md", table(points))
    plot(points, out / "conflict.png")
    print(table(points), flush=True)
    return result


def _pts(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def table(points: list[dict]) -> str:
    lines = ["| verbose_style | prior gap (nats/token) | metric | DPA | Vanilla | DPA − Vanilla | 95% CI | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        for metric in METRICS:
            d = p.get(metric)
            if d:
                verdict = "inconclusive" if d["inconclusive"] else ("DPA better" if d["diff"] > 0 else "Vanilla better")
                ci = f"[{_pts(d['ci_low'])}, {_pts(d['ci_high'])}]" if d["ci_low"] is not None else "–"
                lines.append(f"| {p['verbose_style']:g} | {p['prior_gap_nats']:.2f} | {metric} | "
                             f"{100 * (d['dpa'] or 0):.1f} | {100 * (d['vanilla'] or 0):.1f} | {_pts(d['diff'])} | {ci} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, metric in enumerate(METRICS):
        rows = [(p["prior_gap_nats"], p[metric]) for p in points if p.get(metric)]
        if not rows:
            continue
        xs = [x + 0.02 * k for x, _ in rows]
        ys = [100 * d["diff"] for _, d in rows]
        err = [[100 * (d["diff"] - d["ci_low"]) if d["ci_low"] is not None else 0 for _, d in rows],
               [100 * (d["ci_high"] - d["diff"]) if d["ci_high"] is not None else 0 for _, d in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=metric)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("base-LLM prior gap on the verbose captions (nats/token)")
    ax.set_ylabel("DPA − Vanilla (points, 95% CI)")
    ax.set_title("Conflict dial: world.verbose_style")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
