"""End to end: `dvc repro` of the smoke-size toy study in a temporary copy of the repo.

Checks every stage's outputs, the MLflow runs, the no-op second repro, and what DVC would rerun
after an evaluation-only change and after a proxy change.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest

from tests.e2e_helpers import make_repo_copy, subprocess_env

pytestmark = pytest.mark.slow

ARMS = {"dpa": "align_proxy", "vanilla": "align"}


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
    ceiling = json.loads((o / "eval_reference/ceiling/scores.json").read_text())
    assert {"toy_mcq/overall", "toy_mcq/lik/overall"} <= set(ceiling)
    diag = json.loads((o / "metrics/diagnose-seed0.json").read_text())
    assert {"ppl/base/terse", "ppl/base/verbose", "ppl/proxy/verbose"} <= set(diag)
    for f in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (o / "compare" / f).stat().st_size > 0
    table = (o / "compare/comparison.md").read_text()
    assert "dpa − vanilla" in table and "| vanilla |" in table and "| dpa |" in table
    assert "| ceiling (text oracle) |" in table and "| reference (untrained connector) |" in table
    assert "## Likelihood" in table and "## Paired differences against vanilla" in table
    assert "## Image reliance after alignment" in table
    assert "dpa − vanilla" in first.stdout  # the repro ends with the table printed
    # no work directories or temporary outputs left behind
    assert not list(o.rglob("*.work")) and not list(o.rglob(".*.tmp-*"))


def test_mlflow_has_a_parent_run_per_arm_with_nested_stage_runs(study):
    repo, _ = study
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpa-study")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("dpa.parent") == "true"}
    assert {"dpa-seed0", "vanilla-seed0", "shared", "reference-seed0", "ceiling-seed0"} <= set(parents)
    ceiling = json.loads((repo / "outputs/eval_reference/ceiling/scores.json").read_text())
    assert parents["ceiling-seed0"].data.metrics["toy_mcq/lik/overall"] == pytest.approx(ceiling["toy_mcq/lik/overall"])
    for arm in ARMS:
        parent = parents[f"{arm}-seed0"]
        children = {r.data.tags["dpa.stage"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert {"align", "reliance", "finetune", "merge", "evaluate"} <= set(children)
        assert any(k.startswith("reliance/verbose/") for k in parent.data.metrics)
        assert "compare/toy_mcq/overall/mean" in parent.data.metrics
        align = children["align"]
        history = client.get_metric_history(align.info.run_id, "train/loss")
        assert len(history) >= 2, "per-step loss is logged"
        assert "align.train.learning_rate" in align.data.params
        if arm != "vanilla":
            assert "compare/minus_vanilla/toy_mcq/overall/ci_low" in parent.data.metrics
        # final scores are on the parent too, and equal the DVC metrics file
        scores = json.loads((repo / f"outputs/metrics/evaluate-{arm}-seed0.json").read_text())
        for k, v in scores.items():
            if isinstance(v, (int, float)):
                assert parent.data.metrics[k] == pytest.approx(v)
    dpa_align = next(r for r in runs if r.data.tags.get("dpa.stage") == "align" and r.data.tags.get("dpa.arm") == "dpa")
    assert any(k.startswith("train/cmo/") for k in dpa_align.data.metrics), "CMO weight statistics are logged"


def test_second_repro_runs_nothing(study):
    repo, _ = study
    out = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out


def test_evaluation_only_change_reruns_only_evaluation_and_compare(study):
    repo, _ = study
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("max_new_tokens: 8", "max_new_tokens: 6"))
        would = stages_that_would_run(repo)
        assert would == {"evaluate_proxy@dpa-0", "evaluate@vanilla-0", "evaluate_reference", "compare"}
    finally:
        params.write_text(original)


def test_proxy_change_reruns_the_dpa_arm_only(study):
    repo, _ = study
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("lora: {r: 16, alpha: 32, dropout: 0.0}", "lora: {r: 8, alpha: 16, dropout: 0.0}"))
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
    assert ran == {"evaluate_proxy@dpa-0", "evaluate@vanilla-0", "evaluate_reference", "compare"}, ran
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
