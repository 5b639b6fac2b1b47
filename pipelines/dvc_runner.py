"""Run one DVC stage the way the Prefect flow does, and read the stage graph from DVC.

`run_dvc_stage` runs `dvc --wait-for-lock repro --single-item STAGE` under the supervisor
(pipelines/supervisor.py: the stage command never outlives a cancelled or crashed flow run), streams
its output line by line into a logger, tells whether DVC skipped the stage as up to date, and raises
StageFailed with the tail of the output when it fails. `stage_graph` reads the stages of dvc.yaml and
their dependencies from DVC's own index (what `dvc stage list` and `dvc dag` show), and
`stage_entries` the `dpa stage NAME` each one runs (the registry name, pipelines.entrypoints.STAGES).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SUPERVISOR = Path(__file__).with_name("supervisor.py")
TAIL_LINES = 40
#: what `dpa` prints for a DPAInputError (bad data or config): deterministic, never retried.
INPUT_ERROR_MARK = "[dpa] error:"
SKIPPED_RE = re.compile(r"Stage '([^']+)' didn't change, skipping")
ENTRY_RE = re.compile(r"^dpa stage (\w+)")


class StageFailed(RuntimeError):
    """A DVC stage failed; the message carries the tail of its output."""

    def __init__(self, stage: str, returncode: int, tail: str, input_error: bool = False):
        self.stage, self.returncode, self.tail, self.input_error = stage, returncode, tail, input_error
        kind = "bad input (not retried)" if input_error else f"dvc repro exited with {returncode}"
        super().__init__(f"DVC stage {stage!r} failed ({kind}). Last lines of its output:\n{tail}")

    def __reduce__(self):  # picklable with all fields (Prefect may serialise exceptions)
        return (type(self), (self.stage, self.returncode, self.tail, self.input_error))


def stage_env(flow_run_id: str | None = None) -> dict[str, str]:
    """The environment of the DVC subprocesses: this interpreter's bin first on PATH (DVC's stage
    commands call `dpa`), unbuffered output, and the flow run id for MLflow's tags."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", "5")  # progress bars: a log line every few seconds, not every step
    if flow_run_id:
        env["DPA_PREFECT_FLOW_RUN_ID"] = str(flow_run_id)
    return env


def _kill(proc: subprocess.Popen) -> None:
    """Stop `dvc repro` and the stage command it started (the supervisor's process group)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the supervisor stops its group, SIGKILL after a grace period
    except (ProcessLookupError, PermissionError):
        pass

    def running():  # zombies (exited, not yet reaped) count as gone
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 20
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in running():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_dvc_stage(stage: str, project_dir: str, logger=None, flow_run_id: str | None = None) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` with its output streamed line by line into `logger`.

    Returns {"stage", "skipped"}: skipped is True when DVC found the stage up to date. Raises
    StageFailed with the tail of the output when the stage fails.
    """
    import logging

    logger = logger or logging.getLogger("dpa.prefect")
    dvc = ["-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    cmd = [sys.executable, str(SUPERVISOR), str(os.getpid()), sys.executable, *dvc]
    logger.info("$ dvc --wait-for-lock repro --single-item %s   (in %s)", stage, project_dir)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    skipped = False
    input_error = False
    proc = subprocess.Popen(cmd, cwd=project_dir, env=stage_env(flow_run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            line = raw.rstrip()
            if not line:
                continue
            tail.append(line)
            skipped |= bool(SKIPPED_RE.search(line))
            input_error |= INPUT_ERROR_MARK in line
            logger.info("%s", line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            _kill(proc)  # interrupted: no orphaned training process
    if rc != 0:
        raise StageFailed(stage, rc, "\n".join(tail), input_error=input_error)
    logger.info("stage %s: %s", stage, "up to date (DVC skipped it)" if skipped else "ran")
    return {"stage": stage, "skipped": skipped}



# ---- the stage graph, from DVC's index -----------------------------------------------------------

def _pipeline(project_dir: str | Path):
    """[(stage name, cmd, [names of the stages it depends on])] in dvc.yaml's order."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(project_dir)) as repo:
        graph = repo.index.graph  # an edge stage -> the stage that produces one of its deps
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        return [(s.name, s.cmd, [d.name for d in graph.successors(s) if isinstance(d, PipelineStage)])
                for s in stages]


def stage_graph(project_dir: str | Path) -> dict[str, list[str]]:
    """{stage: [the stages it depends on]} for every stage of dvc.yaml, in topological order (ties
    keep dvc.yaml's order)."""
    pipeline = _pipeline(project_dir)
    return _toposort({name: deps for name, _, deps in pipeline}, [name for name, _, _ in pipeline])


def stage_entries(project_dir: str | Path) -> dict[str, str]:
    """{DVC stage: the registry stage its command runs} (`align_proxy@dpa-0` -> `align`)."""
    out = {}
    for name, cmd, _ in _pipeline(project_dir):
        m = ENTRY_RE.match(cmd if isinstance(cmd, str) else " ".join(cmd))
        if not m:
            raise RuntimeError(f"DVC stage {name!r} runs {cmd!r}, not `dpa stage NAME`.")
        out[name] = m.group(1)
    return out


def _toposort(deps: dict[str, list[str]], order: list[str]) -> dict[str, list[str]]:
    """Stable topological order: always the first stage (in `order`) whose dependencies are done."""
    rank = {n: i for i, n in enumerate(order)}
    done: dict[str, list[str]] = {}
    pending = sorted(deps, key=lambda n: rank.get(n, len(rank)))
    while pending:
        ready = next((n for n in pending if all(d in done for d in deps[n])), None)
        if ready is None:
            raise RuntimeError(f"cycle in the DVC stage graph among {pending}")
        done[ready] = sorted(deps[ready], key=lambda d: rank.get(d, len(rank)))
        pending.remove(ready)
    return done
