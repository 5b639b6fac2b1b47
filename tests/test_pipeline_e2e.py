"""End to end: `dvc repro` of the smoke-size toy study in a temporary copy of the repo.

Checks every stage's outputs, the MLflow runs (and the MLflow UI in headless Chromium), the loss
curves as DVC plots, `dpa chat` / `dpa eval` on the merged models, the no-op second repro, and
what DVC would rerun after an evaluation-only change and after a proxy change.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from html.parser import HTMLParser

import pytest

from tests.e2e_helpers import (REPO, chromium, free_port, make_repo_copy, start, stop, subprocess_env, venv_bin,
                               wait_http)

pytestmark = pytest.mark.slow

ARMS = {"dpa": "align_proxy", "vanilla": "align", "no_align": "align"}
ARTIFACTS = REPO / "test-artifacts"


def run(cmd, repo, check=True, timeout=2400, **env):
    res = subprocess.run(cmd, cwd=repo, env=subprocess_env(repo, **env), capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def stages_that_would_run(repo) -> set[str]:
    """What `dvc repro` would run, downstream stages included (a dry run alone lists only the
    stages whose own dependencies changed)."""
    out = run(["dvc", "repro", "--dry", "--force-downstream"], repo).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    repo = make_repo_copy(tmp_path_factory.mktemp("e2e"), profile="smoke")
    first = run(["dvc", "repro"], repo)
    return repo, first


def test_every_stage_wrote_its_outputs(study):
    repo, first = study
    o = repo / "outputs"
    assert (repo / "data/toyworld/models/llm/config.json").is_file()
    assert json.loads((o / "mix/captions.json").read_text())
    assert (o / "mix/text_corpus.jsonl").stat().st_size > 0
    assert (o / "proxy/seed0/adapter_config.json").is_file()
    for arm in ARMS:
        assert (o / f"align/{arm}-seed0/connector.safetensors").is_file()
        assert (o / f"finetune/{arm}-seed0/adapter/adapter_config.json").is_file()
        assert (o / f"merged/{arm}-seed0/config.json").is_file()
        scores = json.loads((o / f"eval/{arm}-seed0/scores.json").read_text())
        assert any(k.startswith("toy_mcq/") for k in scores)
        assert (o / f"metrics/evaluate-{arm}-seed0.json").is_file()
        assert any(k.startswith("toy_mcq/lik/") for k in scores), "likelihood scoring beside generation"
        preds = [json.loads(line) for line in (o / f"eval/{arm}-seed0/toy_mcq/predictions.jsonl").read_text().splitlines()]
        assert all("correct" in r and "lik_correct" in r for r in preds)
        reliance = json.loads((o / f"metrics/reliance-{arm}-seed0.json").read_text())
        assert {f"reliance/{style}/{kind}" for style in ("terse", "verbose") for kind in ("all", "content", "style")} \
            <= set(reliance)
        # per word class, and the text oracle (the world's held-out captions carry the scene in words)
        assert {f"reliance/{pre}{style}/content/{c}" for pre in ("", "text_oracle/") for style in ("terse", "verbose")
                for c in ("colour", "shape")} <= set(reliance)
    ceiling = json.loads((o / "eval_reference/ceiling/scores.json").read_text())
    assert {"toy_mcq/overall", "toy_mcq/lik/overall"} <= set(ceiling)
    diag = json.loads((o / "metrics/diagnose-seed0.json").read_text())
    assert {"ppl/base/terse", "ppl/base/verbose", "ppl/proxy/verbose"} <= set(diag)
    # the proxy LLM answers the ceiling's questions too: what the proxy stage kept of the base LLM's reading
    proxy_ceiling = json.loads((o / "diagnose/seed0/scores.json").read_text())
    assert set(ceiling) == set(proxy_ceiling) and diag["text_oracle/proxy/toy_mcq/overall"] == \
        proxy_ceiling["toy_mcq/overall"]
    assert json.loads((o / "diagnose/seed0/report.json").read_text())["proxy_adapter"].endswith("proxy/seed0")
    for f in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (o / "compare" / f).stat().st_size > 0
    table = (o / "compare/comparison.md").read_text()
    assert "dpa − vanilla" in table and "| vanilla |" in table and "| dpa |" in table
    assert "| ceiling (text oracle) |" in table and "| reference (untrained connector) |" in table
    assert "| proxy LLM, text oracle (what PMO kept) |" in table
    assert "## Likelihood" in table and "## Paired differences against vanilla" in table
    assert "## Image reliance after alignment" in table
    assert "dpa − vanilla" in first.stdout  # the repro ends with the table printed
    # no work directories or temporary outputs left behind
    assert not list(o.rglob("*.work")) and not list(o.rglob(".*.tmp-*"))


def test_mlflow_has_a_parent_run_per_arm_with_nested_stage_runs(study):
    repo, _ = study
    from mlflow.tracking import MlflowClient

    from pipelines.entrypoints import headline_scores

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpa-study")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training layout
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parent_runs = [r for r in runs if r.data.tags.get("dpa.parent") == "true"]
    parents = {r.info.run_name: r for r in parent_runs}
    assert len(parents) == len(parent_runs), "parent run names are unique"
    assert {"dpa-seed0", "vanilla-seed0", "no_align-seed0", "reference-seed0", "ceiling-seed0", "shared",
            "study"} == set(parents)
    ceiling = json.loads((repo / "outputs/eval_reference/ceiling/scores.json").read_text())
    assert parents["ceiling-seed0"].data.metrics["toy_mcq/lik/overall"] == pytest.approx(ceiling["toy_mcq/lik/overall"])
    for parent in parent_runs:  # a parent spans its stages: first start to last end
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert children and parent.info.status == "FINISHED"
        assert parent.info.start_time <= min(c.info.start_time for c in children)
        assert parent.info.end_time >= max(c.info.end_time for c in children)
        # stages run one after another: the parent lasts at least as long as they do together
        assert parent.info.end_time - parent.info.start_time >= sum(c.info.end_time - c.info.start_time
                                                                    for c in children)
    shared = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["shared"].info.run_id}
    assert {"world", "mix", "proxy-seed0", "diagnose-seed0"} <= shared
    for arm in ARMS:
        parent = parents[f"{arm}-seed0"]
        assert parent.data.params == {"arm": arm, "seed": "0", "profile": "smoke",
                                      "proxy": "true" if arm == "dpa" else "false",
                                      "loss": "cmo" if arm == "dpa" else "vanilla",
                                      "align": "false" if arm == "no_align" else "true"}
        children = {r.data.tags["dpa.stage"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert {"align", "reliance", "finetune", "merge", "evaluate"} <= set(children)
        assert any(k.startswith("reliance/verbose/") for k in parent.data.metrics)
        assert "compare/toy_mcq/overall/mean" in parent.data.metrics
        align = children["align"]
        history = client.get_metric_history(align.info.run_id, "train/loss")
        if arm == "no_align":  # the control: the untrained connector, no training run
            assert not history and align.data.params["align"] == "skipped (arm align: false)"
        else:
            assert len(history) >= 2, "per-step loss is logged"
            assert "align.train.learning_rate" in align.data.params
        if arm != "vanilla":
            assert "compare/minus_vanilla/toy_mcq/overall/ci_low" in parent.data.metrics
        # the headline scores are on the parent (its columns), equal to the DVC metrics file's
        scores = json.loads((repo / f"outputs/metrics/evaluate-{arm}-seed0.json").read_text())
        heads = headline_scores(scores)
        assert {"average", "toy_mcq/overall", "text_facts/acc"} == set(heads) <= set(parent.data.metrics)
        for k, v in heads.items():
            assert parent.data.metrics[k] == pytest.approx(v)
        for k, v in scores.items():  # every score on the evaluate run
            if isinstance(v, (int, float)):
                assert children["evaluate"].data.metrics[k] == pytest.approx(v)
    dpa_align = next(r for r in runs if r.data.tags.get("dpa.stage") == "align" and r.data.tags.get("dpa.arm") == "dpa")
    assert any(k.startswith("train/cmo/") for k in dpa_align.data.metrics), "CMO weight statistics are logged"
    study_run = parents["study"]
    assert {a.path for a in client.list_artifacts(study_run.info.run_id)} >= {"comparison.png", "comparison.md",
                                                                              "comparison.csv"}
    compare = json.loads((repo / "outputs/metrics/compare.json").read_text())
    assert study_run.data.metrics["dpa_minus_vanilla/average"] == pytest.approx(compare["dpa_minus_vanilla/average"])
    view = json.loads(exp.tags["mlflow.sharedViewState.dpa-vs-vanilla"])
    assert "metrics.`average`" in json.loads(view["state"])["selectedColumns"]


class _Grid(HTMLParser):
    """Cells of MLflow's runs table (ag-grid) by row id and column id, from the rendered DOM."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.row = self.cell = None
        self.depth = 0
        self.cell_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag != "div":
            return
        self.depth += 1
        if a.get("role") == "row" and a.get("row-id"):
            self.row = self.rows.setdefault(a["row-id"], {})
        elif a.get("role") == "gridcell" and self.row is not None and a.get("col-id"):
            self.cell, self.cell_depth = a["col-id"], self.depth
            self.row[self.cell] = ""

    def handle_endtag(self, tag):
        if tag != "div":
            return
        if self.cell is not None and self.depth == self.cell_depth:
            self.cell = None
        self.depth -= 1

    def handle_data(self, data):
        if self.cell is not None:
            self.row[self.cell] += data


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (bash scripts/install_browser.sh)")
def test_mlflow_ui_opens_on_the_comparison(study, tmp_path):
    """`mlflow ui` on the study's store, in a real headless Chromium: the link the study prints opens
    the runs table (model-training layout) on the saved view, with both arms and their scores."""
    repo, first = study
    from mlflow.tracking import MlflowClient

    link = re.search(r"\[dpa\] MLflow: (http://127\.0\.0\.1:5000/\S+)", first.stdout)
    assert link, "the compare stage prints where to look"
    port = free_port()
    url = link.group(1).replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    log = tmp_path / "mlflow-ui.log"
    server = start([str(venv_bin() / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}",
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log, cwd=repo,
                   env=subprocess_env(repo))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, server, log)
        chrome = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
                  "--virtual-time-budget=30000", "--window-size=1600,900", "--hide-scrollbars"]
        dom = subprocess.run([*chrome, "--dump-dom", url], capture_output=True, text=True, timeout=300).stdout
        ARTIFACTS.mkdir(exist_ok=True)
        subprocess.run([*chrome, f"--screenshot={ARTIFACTS / 'mlflow-ui.png'}", url], capture_output=True,
                       timeout=300)
    finally:
        stop(server)
    grid = _Grid()
    grid.feed(dom)
    by_name = {}
    for cells in grid.rows.values():
        # the cell shows the run's colour swatch (its hex code as hidden text) before the name
        name = re.sub(r"^#[0-9a-fA-F]{6}", "", cells.get("attributes.`Run Name`", "").strip())
        if name:
            by_name[name] = cells
    assert {"dpa-seed0", "vanilla-seed0"} <= set(by_name), f"runs table rows: {sorted(by_name)}"
    assert "DPA vs Vanilla" in dom and "Model training" in dom
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpa-study")
    for arm in ARMS:
        parent = client.search_runs([exp.experiment_id], f"tags.`dpa.parent` = 'true' and tags.`dpa.arm` = '{arm}'")[0]
        row = by_name[f"{arm}-seed0"]
        shown = float(row["metrics.`average`"])  # the overall score, a column of the view
        assert shown == pytest.approx(parent.data.metrics["average"], abs=5e-4)
        assert row["params.`arm`"].strip() == arm
    assert (ARTIFACTS / "mlflow-ui.png").stat().st_size > 10_000


def test_loss_curves_are_dvc_plots(study, tmp_path):
    """Every training stage's per-step loss, learning rate and token-weight mean, arms overlaid."""
    repo, _ = study
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    for plot in ("proxy loss", "align loss", "align CMO weight mean", "align learning rate", "finetune loss",
                 "finetune learning rate"):
        spec = shown[plot][0]["content"]
        field = spec["encoding"]["y"]["field"]
        values = spec["data"]["values"]
        assert spec["encoding"]["color"]["field"] == "series"  # one line per arm-seed (and experiment)
        runs = {v["run"] for v in values}
        # the no-alignment control has no align curve, only a finetune one
        arms = {"dpa-seed0", "vanilla-seed0"} | ({"no_align-seed0"} if plot.startswith("finetune") else set())
        assert runs == ({"proxy-seed0"} if plot.startswith("proxy") else arms), plot
        assert all(isinstance(v[field], float) for v in values)
    # the curves are the training histories, step by step
    history = json.loads((repo / "outputs/align/dpa-seed0/history.json").read_text())
    curve = [v for v in shown["align loss"][0]["content"]["data"]["values"] if v["run"] == "dpa-seed0"]
    assert [(v["step"], v["loss"]) for v in curve] == [(h["step"], h["loss"]) for h in history if "loss" in h]
    weights = {v["run"]: v["weight_mean"] for v in shown["align CMO weight mean"][0]["content"]["data"]["values"]}
    assert 0.05 <= weights["dpa-seed0"] <= 0.5 and weights["vanilla-seed0"] == 1.0  # CMO clamp; plain CE
    out = tmp_path / "plots"
    run(["dvc", "plots", "show", "-o", str(out)], repo)
    html = (out / "index.html").read_text()
    assert "align loss" in html and "dpa-seed0" in html and "vanilla-seed0" in html


def test_chat_and_eval_on_the_merged_models(study, tmp_path):
    repo, _ = study
    image = sorted((repo / "data/toyworld/images").rglob("*.png"))[0]
    res = run(["dpa", "chat", "outputs/merged/dpa-seed0", "--image", str(image), "--prompt",
               "What colour is the shape?", "--max-new-tokens", "12"], repo)
    assert res.stdout.strip(), "a reply is printed"
    # `dpa eval` is the evaluate stage's evaluation: the same scores, outside DVC
    res = run(["dpa", "eval", "outputs/merged/vanilla-seed0", "--out", str(tmp_path / "eval")], repo)
    stage = json.loads((repo / "outputs/eval/vanilla-seed0/scores.json").read_text())
    again = json.loads((tmp_path / "eval/scores.json").read_text())
    assert {k: v for k, v in again.items() if "seconds" not in k} == {k: v for k, v in stage.items() if "seconds" not in k}
    assert f"| toy_mcq/overall | {100 * stage['toy_mcq/overall']:.1f} |" in res.stdout


def test_second_repro_runs_nothing(study):
    repo, _ = study
    out = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out


# What an `evaluate` setting reruns at smoke size (one seed): every evaluation, and diagnose, which asks
# the proxy LLM the ceiling's questions with the evaluate settings.
STAGES_AN_EVALUATION_SETTING_RERUNS = {"evaluate_proxy@dpa-0", "evaluate@vanilla-0", "evaluate@no_align-0",
                                       "evaluate_reference", "diagnose@0", "compare"}


def test_evaluation_only_change_reruns_only_evaluation_and_compare(study):
    repo, _ = study
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("max_new_tokens: 8", "max_new_tokens: 6"))
        would = stages_that_would_run(repo)
        assert would == STAGES_AN_EVALUATION_SETTING_RERUNS
    finally:
        params.write_text(original)


def test_proxy_change_reruns_the_dpa_arm_only(study):
    repo, _ = study
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        lora = "  lora:\n    r: 16\n    alpha: 32\n    dropout: 0.0\n"  # proxy.lora (the first lora block)
        assert lora in original
        params.write_text(original.replace(lora, lora.replace("r: 16", "r: 8").replace("alpha: 32", "alpha: 16"), 1))
        would = stages_that_would_run(repo)
        assert {"proxy@0", "align_proxy@dpa-0", "finetune_proxy@dpa-0", "merge_proxy@dpa-0",
                "evaluate_proxy@dpa-0", "compare"} <= would
        assert not any("vanilla" in s for s in would), would
    finally:
        params.write_text(original)


def test_exp_run_sweeps_a_setting(study):
    """`dvc exp run -S` reruns what the setting touches and records the experiment."""
    repo, _ = study
    res = run(["dvc", "exp", "run", "-S", "evaluate.max_new_tokens=6"], repo)
    ran = set(re.findall(r"Running stage '([^']+)'", res.stdout))
    assert ran == STAGES_AN_EVALUATION_SETTING_RERUNS, ran
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "evaluate.max_new_tokens" in shown


def test_stage_finishes_when_mlflow_is_down(study):
    repo, _ = study
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run(["dpa", "stage", "compare"], repo, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert (repo / "outputs/compare/comparison.md").is_file()
    assert "not logged" in res.stdout + res.stderr


def test_exp_run_set_wins_over_the_profile(study):
    """Under a profile that sets proxy.lora.r, `dvc exp run -S proxy.lora.r=N` trains the proxy with
    N, and DVC records N (issue 12, item 1a): params.yaml is composed by DVC from conf/, the stage
    reads only params.yaml."""
    repo, _ = study
    smoke = (repo / "conf/profile/smoke.yaml").read_text().replace("profile: smoke", "profile: smoke_r4")
    assert smoke.count("\nproxy:\n") == 1
    smoke = smoke.replace("\nproxy:\n", "\nproxy:\n  lora: {r: 4, alpha: 8, dropout: 0.0}\n")
    (repo / "conf/profile/smoke_r4.yaml").write_text(smoke)
    res = run(["dvc", "exp", "run", "-S", "profile=smoke_r4", "-S", "proxy.lora.r=2", "proxy@0"], repo)
    ran = set(re.findall(r"Running stage '([^']+)'", res.stdout))
    assert ran == {"proxy@0"}, ran  # world and mix: same settings as under smoke, cached
    adapter = json.loads((repo / "outputs/proxy/seed0/adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (2, 8)  # -S wins over the profile, the rest is the profile's
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))
    assert any(r["proxy.lora.r"] == "2" and r["profile"] == "smoke_r4" for r in rows), rows
