"""Issue 15, items 4 and 6: a killed stage leaves no RUNNING MLflow run behind, and the test suite
does not depend on what a run of the pipeline left in the checkout (the README's order)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_helpers import REPO, make_repo_copy

STAGE = """
import sys, time
from pipelines.tracking import Tracker
t = Tracker(sys.argv[1], "leftovers")
parent = t.parent_run("dpa-seed0", {"dpa.arm": "dpa", "dpa.seed": "0"})
with t.stage_run(parent, "align", {"dpa.stage": "align"}) as run:
    print("RUN", run.run_id, flush=True)
    time.sleep(600)
"""


def _start_and_kill(uri: str, sig: int, tmp_path: Path) -> str:
    proc = subprocess.Popen([sys.executable, "-c", STAGE, uri], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    assert line.startswith("RUN "), line
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return line.split()[1]


@pytest.fixture()
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sigkilled_stage_run_is_ended_at_the_next_start(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import Tracker

    killed = _start_and_kill(store, signal.SIGKILL, tmp_path)
    client = MlflowClient(store)
    assert client.get_run(killed).info.status == "RUNNING"  # what a SIGKILL leaves
    t = Tracker(store, "leftovers")
    parent = t.parent_run("dpa-seed0", {"dpa.arm": "dpa", "dpa.seed": "0"})
    with t.stage_run(parent, "finetune", {"dpa.stage": "finetune"}):
        pass
    assert client.get_run(killed).info.status == "RUNNING"  # another stage's start leaves it alone
    with t.stage_run(parent, "align", {"dpa.stage": "align"}) as run:
        pass
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_sigterm_ends_the_stage_run_as_killed(store, tmp_path):
    from mlflow.tracking import MlflowClient

    killed = _start_and_kill(store, signal.SIGTERM, tmp_path)
    assert MlflowClient(store).get_run(killed).info.status == "KILLED"


def test_repo_copy_ignores_what_a_pipeline_run_left_in_the_checkout(tmp_path):
    """After `bash scripts/demo.sh` the checkout holds dvc.lock (not ignored), outputs, data, an
    MLflow store: a copy for the tests has none of them."""
    checkout = make_repo_copy(tmp_path / "a")  # a real git checkout of this project
    (checkout / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for rel in ("outputs/metrics/align-dpa-seed0.json", "outputs/mix/captions.json", "data/toyworld/manifest.json",
                "mlflow.db", ".dvc/tmp/lock"):
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text("{}")
    copy = make_repo_copy(tmp_path / "b", source=checkout)
    assert not (copy / "dvc.lock").exists()
    for rel in ("outputs", "data", "mlflow.db", ".dvc/tmp/lock"):
        assert not (copy / rel).exists(), rel
    assert (copy / "params.yaml").read_text() == (checkout / "params.yaml").read_text()
    assert (copy / "dvc.yaml").is_file() and (copy / "dpa_core" / "trainer.py").is_file()


def test_this_checkout_copies_without_dvc_lock(tmp_path):
    assert not (make_repo_copy(tmp_path) / "dvc.lock").exists()
