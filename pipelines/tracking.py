"""MLflow tracking for the pipeline: one parent run per arm and seed, one nested run per stage.

Stages run in separate processes (DVC, Prefect), so a parent run is found again by its tags
(profile, arm, seed) or created. A parent run carries the arm's settings as params (arm, proxy,
loss, seed, profile), its headline scores as metrics, and spans its stages: it starts with the
first one and its end time moves to the end of each stage that finishes under it. The experiment
is created as a model-training experiment (tag `mlflow.experimentKind`), so `mlflow ui` opens on
the runs table. If the tracking store is down, training goes on: every call that could not log is
collected and reported once, clearly, at the end of the stage.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from .params import flatten

log = logging.getLogger("dpa.tracking")

PARENT_TAG = "dpa.parent"
# The experiment type MLflow 3's UI reads to choose between its GenAI layout (traces) and its
# model-training layout (runs table): the values the UI offers are genai_development and
# custom_model_development (mlflow/server/js, ExperimentKind); the UI's type selector sets it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved view of the runs table ("Views" menu of MLflow 3's UI): an experiment tag
# `mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state}, where state is the
# runs page's search facets + UI state as JSON, as the UI itself writes it (MLflow 3.17).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "dpa-vs-vanilla"
VIEW_NAME = "DPA vs Vanilla"


def tracking_uri(configured: str) -> str:
    """MLFLOW_TRACKING_URI wins over params.yaml; a relative sqlite path is made absolute to the project."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


class Tracker:
    """Thin, failure-tolerant wrapper around the MLflow client."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.failures: list[str] = []
        self.client = None
        self.experiment_id = None
        # Fail fast instead of retrying for minutes when a server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            mlflow.set_tracking_uri(uri)
            self.client = MlflowClient(uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                self.experiment_id = self.client.create_experiment(
                    experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:  # a store made before the tag was set
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as e:  # any store error: keep training, say so
            self._fail("connect", e)
            self.client = None

    @property
    def active(self) -> bool:
        return self.client is not None

    def _fail(self, what: str, err: Exception) -> None:
        msg = f"{what}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        self.failures.append(msg)
        log.warning("MLflow (%s) not logged: %s", self.uri, msg)

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.active:
            self.failures.append(f"{what}: tracking store unavailable")
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self._fail(what, e)
            return None

    # -- runs -----------------------------------------------------------------------------------
    def parent_run(self, name: str, tags: dict[str, str], params: dict[str, Any] | None = None) -> str | None:
        """The parent run with these tags (the newest), created with `params` if none exists."""
        def find_or_create():
            query = " and ".join([f"tags.`{PARENT_TAG}` = 'true'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()])
            found = self.client.search_runs([self.experiment_id], query, max_results=1,
                                            order_by=["attributes.start_time DESC"])
            if found:
                return found[0].info.run_id
            run = self.client.create_run(self.experiment_id, run_name=name, tags={PARENT_TAG: "true", **tags})
            if params:
                from mlflow.entities import Param

                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
            return run.info.run_id
        return self._call(f"parent run {name}", find_or_create)

    def end_leftovers(self, parent_id: str, name: str) -> list[str]:
        """End, as KILLED, the runs of this stage (same parent, same name) that a killed earlier
        attempt left RUNNING: one stage of one arm and seed never runs twice at once (DVC's lock)."""
        def end():
            query = (f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.run_name = '{name}' "
                     "and attributes.status = 'RUNNING'")
            ids = [r.info.run_id for r in self.client.search_runs([self.experiment_id], query, max_results=100)]
            for run_id in ids:
                self.client.set_tag(run_id, "dpa.ended_by", "the next start of the stage (the run was killed)")
                self.client.set_terminated(run_id, "KILLED")
            if ids:
                print(f"[dpa] MLflow: ended {len(ids)} run(s) of {name} left RUNNING by a killed attempt as KILLED.",
                      flush=True)
            return ids
        return self._call(f"end leftover runs of {name}", end) or []

    @contextmanager
    def stage_run(self, parent_id: str | None, name: str, tags: dict[str, str]) -> Iterator["StageRun"]:
        """A nested run under `parent_id`. The parent shows RUNNING while the stage runs and its end
        time becomes the stage's end, so its duration spans all its stages."""
        run_id = None
        if parent_id is not None and self.active:
            self.end_leftovers(parent_id, name)
        if parent_id is not None:
            run = self._call(f"stage run {name}", self.client.create_run, self.experiment_id, run_name=name,
                             tags={"mlflow.parentRunId": parent_id, **tags})
            run_id = run.info.run_id if run else None
            if run_id:
                self._call("parent status", self.client.update_run, parent_id, "RUNNING")
        stage = StageRun(self, run_id, parent_id)
        status = "FAILED"
        previous = _raise_on_sigterm()
        try:
            yield stage
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (a Prefect cancel, `kill`)
            status = "KILLED"
            raise
        finally:
            _restore_sigterm(previous)
            if run_id:
                self._call("end run", self.client.set_terminated, run_id, status)
                self._call("end parent run", self.client.set_terminated, parent_id, status)
            self.report()

    def save_runs_view(self, score_keys: list[str], params: tuple[str, ...] = ("arm", "proxy", "loss", "seed")) -> None:
        """The saved view "DPA vs Vanilla": the parent runs (one per arm and seed, shared, study) with the arms' settings and headline
        scores as columns, best average first. Open it with `runs_view_url`."""
        import json
        import time

        def column(kind: str, key: str) -> str:
            return f"{kind}.`{key}`"

        state = {
            # search facets
            "searchFilter": f"tags.`{PARENT_TAG}` = 'true'",
            "orderByKey": column("metrics", score_keys[0]) if score_keys else "attributes.start_time", "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs",
            "datasetsFilter": [],
            # table state
            "selectedColumns": [*(column("params", k) for k in params), *(column("metrics", k) for k in score_keys)],
            "columnOrder": [], "columnWidths": {}, "runsExpanded": {}, "runsPinned": [], "runsHidden": [],
            "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
            "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
            "groupsExpanded": {}, "autoRefreshEnabled": True,
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        }
        now = int(time.time() * 1000)
        envelope = json.dumps({"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})
        self._call("runs view", lambda: self.client.set_experiment_tag(self.experiment_id, VIEW_TAG_PREFIX + VIEW_ID,
                                                                       envelope))

    def runs_view_url(self) -> str | None:
        return runs_view_url(self.client, self.uri, self.experiment_id) if self.active else None

    def report(self) -> None:
        if self.failures:
            log.warning("MLflow: %d item(s) were NOT logged to %s (the stage's outputs on disk are complete):\n  %s",
                        len(self.failures), self.uri, "\n  ".join(self.failures[:20]))
            print(f"[dpa] WARNING: {len(self.failures)} MLflow item(s) not logged to {self.uri}; "
                  f"first: {self.failures[0]}", flush=True)


def _raise_on_sigterm():
    """SIGTERM ends the stage through its `finally` blocks (the MLflow run is marked KILLED) instead of
    killing the process on the spot. SIGKILL cannot be caught: `end_leftovers` covers it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def ui_address(uri: str) -> str:
    """Where the MLflow UI of a tracking URI is: the server itself, or `mlflow ui`'s default."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def runs_view_url(client, uri: str, experiment_id: str) -> str | None:
    """The UI address of the experiment's runs table in model-training mode, opened on the saved
    view "DPA vs Vanilla" when there is one."""
    try:
        exp = client.get_experiment(experiment_id)
    except Exception:  # a store that is down: no address to give
        return None
    query = "workflowType=machine_learning"
    if VIEW_TAG_PREFIX + VIEW_ID in exp.tags:
        query += f"&viewStateShareKey={VIEW_ID}"
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs?{query}"


def existing_runs_view_url(uri: str, experiment: str) -> str | None:
    """runs_view_url for an experiment that already exists (nothing is created); None otherwise."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception:
        return None
    return runs_view_url(client, uri, exp.experiment_id) if exp is not None else None


class StageRun:
    """Logging into one stage run (and, for final scores, its parent). Every call goes through
    `_do`, so a missing run or a store that went down is recorded, never raised."""

    def __init__(self, tracker: Tracker, run_id: str | None, parent_id: str | None):
        self.tracker, self.run_id, self.parent_id = tracker, run_id, parent_id

    def _do(self, what: str, method: str, run_id: str | None, *args, **kwargs):
        if run_id is None or not self.tracker.active:
            self.tracker.failures.append(f"{what}: tracking store unavailable")
            return None
        return self.tracker._call(what, getattr(self.tracker.client, method), run_id, *args, **kwargs)

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for s in range(0, len(items), 100):
            self._do("params", "log_batch", self.run_id, params=items[s : s + 100])

    def metrics(self, metrics: dict[str, float], step: int | None = None, on_parent: bool = False) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for rid in [self.run_id] + ([self.parent_id] if on_parent else []):
            for s in range(0, len(items), 500):
                self._do("metrics", "log_batch", rid, metrics=items[s : s + 500])

    def artifact(self, path: str | Path, artifact_path: str | None = None, on_parent: bool = False) -> None:
        path = Path(path)
        self._do(f"artifact {path}", "log_artifacts" if path.is_dir() else "log_artifact",
                 self.parent_id if on_parent else self.run_id, str(path), artifact_path)

    def tag(self, key: str, value: str) -> None:
        self._do(f"tag {key}", "set_tag", self.run_id, key, value)


class MlflowStepLogger(TrainerCallback):
    """Per-step loss, learning rate and CMO weight statistics into the stage run (main process only)."""

    def __init__(self, run: StageRun):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.run.metrics({f"train/{k}": v for k, v in logs.items()}, step=state.global_step)


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / in metric names.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)
