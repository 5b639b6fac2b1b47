"""MLflow tracking on a real (SQLite) store: the experiment type, parent runs with params that span
their stages, the saved runs view and its address. The UI itself: test_pipeline_e2e.py."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, VIEW_ID, VIEW_TAG_PREFIX, Tracker,
                                existing_runs_view_url)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiment_is_a_model_training_experiment(store):
    t = Tracker(store, "study")
    assert t.client.get_experiment(t.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # an experiment made before the tag existed gets it
    old = t.client.create_experiment("older")
    Tracker(store, "older")
    assert t.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_parent_run_has_params_and_spans_its_stages(store):
    t = Tracker(store, "study")
    tags = {"dpa.profile": "toy", "dpa.arm": "dpa", "dpa.seed": "0"}
    params = {"arm": "dpa", "seed": 0, "profile": "toy", "proxy": "true", "loss": "cmo"}
    parent = t.parent_run("dpa-seed0", tags, params)
    assert t.parent_run("dpa-seed0", tags, params) == parent  # found again, not duplicated
    ends = []
    for stage in ("align", "finetune"):
        with t.stage_run(parent, stage, {**tags, "dpa.stage": stage}) as run:
            assert t.client.get_run(parent).info.status == "RUNNING"
            run.metrics({"average": 0.5}, on_parent=True)
            time.sleep(0.05)
        ends.append(t.client.get_run(run.run_id).info.end_time)
    info = t.client.get_run(parent)
    assert info.info.status == "FINISHED" and info.info.end_time >= ends[-1] > ends[0]
    assert info.data.params == {k: str(v) for k, v in params.items()}
    assert info.data.metrics == {"average": 0.5}
    assert not t.failures


def test_failed_stage_marks_its_parent_failed(store):
    t = Tracker(store, "study")
    parent = t.parent_run("vanilla-seed0", {"dpa.arm": "vanilla"})
    with pytest.raises(RuntimeError):
        with t.stage_run(parent, "align", {"dpa.stage": "align"}):
            raise RuntimeError("boom")
    assert t.client.get_run(parent).info.status == "FAILED"


def test_saved_view_and_its_address(store, tmp_path):
    assert existing_runs_view_url(store, "study") is None  # no store yet: nothing created
    t = Tracker(store, "study")
    assert t.runs_view_url() == f"http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs?workflowType=machine_learning"
    t.save_runs_view(["average", "toy_mcq/overall"])
    envelope = json.loads(t.client.get_experiment(t.experiment_id).tags[VIEW_TAG_PREFIX + VIEW_ID])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "DPA vs Vanilla" and isinstance(envelope["createdAt"], int)
    assert state["selectedColumns"] == ["params.`arm`", "params.`proxy`", "params.`loss`", "params.`seed`",
                                        "metrics.`average`", "metrics.`toy_mcq/overall`"]
    assert state["orderByKey"] == "metrics.`average`" and state["searchFilter"] == "tags.`dpa.parent` = 'true'"
    url = existing_runs_view_url(store, "study")
    assert url == t.runs_view_url() and url.endswith(f"&viewStateShareKey={VIEW_ID}")
    assert existing_runs_view_url(store, "another") is None


def test_store_down_is_reported_not_raised(tmp_path):
    t = Tracker("http://127.0.0.1:9", "study")  # nothing listens on port 9
    assert not t.active and t.runs_view_url() is None
    with t.stage_run(t.parent_run("x", {}), "align", {}) as run:
        run.metrics({"a": 1.0}, on_parent=True)
        run.artifact(tmp_path, on_parent=True)
    t.save_runs_view(["average"])
    assert len(t.failures) >= 3
