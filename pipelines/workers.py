"""Scale-out: the study's arm x seed chains side by side, each in its own DVC workspace, one shared
DVC cache, and the DVC remote as the team's store.

Built from DVC's and Prefect's own mechanisms only:

* **Workspaces.** Each chain (one arm and seed: align -> reliance, finetune -> merge -> evaluate)
  runs in its own git worktree (`git worktree add --detach`) of a snapshot commit of the checkout
  as it is on disk (tracked files and untracked files git does not ignore, as `dvc exp run` does;
  the branch is not touched). The worktree's `.dvc/config.local` points `cache.dir` at the main
  checkout's cache, so every workspace reads and writes ONE content-addressed cache (DVC adds
  objects by writing a temporary file and renaming it: concurrent writers never expose a partial
  object), and each workspace has its own DVC lock, so chains never wait for each other.
* **Shared stages once.** The stages every chain needs (world, mix, proxy@seed) run first in the
  main checkout; the snapshot taken after them carries their dvc.lock entries, so a worker finds
  them up to date and only checks their outputs out of the shared cache.
* **Concurrency.** A Prefect flow (`dpa-study-parallel`) submits one task per chain to its task
  runner (`ThreadPoolTaskRunner(max_workers=N)`, N = `--workers`); each task runs its chain's
  stages with `dvc repro --single-item` in its workspace. Stages that are neither shared nor part
  of a chain (diagnose@seed, evaluate_reference) are units of their own.
* **Fold back.** When every unit is done, one `dvc repro` in the main checkout finds each chain's
  stages in DVC's run-cache (kept in the shared cache: "Stage '...' is cached - skipping run,
  checking out outputs"), checks their outputs out, writes dvc.lock, and runs compare and curves.
* **Remote.** `dvc push --run-cache` to the default DVC remote (`.dvc/config`: a local directory
  next to the checkout, `../dpa-dvc-remote`; S3/GCS/SSH in docs/scaleout.md): after each stage
  (`--push stage`, in the workspace that ran it), once at the end (`--push end`, default), or
  never. DVC's local remote writes every object to a temporary name and renames it, so a push
  killed half-way leaves no partial object that a later `dvc pull` would accept.
* **Failure containment.** A unit that fails (or whose runner is killed) fails its task only: the
  other units run to the end, the fold-back does not run, and the flow run ends Failed naming the
  unit. The failed unit's workspace is kept; the next run reuses it (the stage resumes from its
  last complete checkpoint) and restores every finished unit from the run-cache.

Entry points:
    dpa workers [--workers 2] [--push end|stage|never] [--profile smoke] [--proxy-arms ...] [-S k=v]
    python -m pipelines.workers ...   (the same)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.params import load_params, parse_override
from pipelines.dvc_runner import (INPUT_ERROR_MARK, SUPERVISOR, TAIL_LINES, StageFailed, _kill, stage_entries, stage_env,
                                  stage_graph)
from pipelines.prefect_flow import PARAMS_FILE, StudyFailed, apply_params, build_overrides

FLOW_NAME = "dpa-study-parallel"
PUSH_CHOICES = ("end", "stage", "never")
#: stage families that belong to one arm and seed (their DVC item is "ARM-SEED")
CHAIN_FAMILIES = frozenset({"align", "reliance", "finetune", "merge", "evaluate"})
WORKSPACES = Path(".dvc") / "tmp" / "workers"  # DVC's own temporary area (git-ignored, DVC-ignored)


class ScaleoutError(RuntimeError):
    """A setting or a repository state the scale-out runner cannot work with; says what to do."""


# ---- the plan: shared stages, independent units, the fold-back -----------------------------------

@dataclass
class Plan:
    shared: list[str] = field(default_factory=list)          # run once, first, in the main checkout
    units: dict[str, list[str]] = field(default_factory=dict)  # key -> its stages, in order
    final: list[str] = field(default_factory=list)           # after every unit (compare, curves)
    inputs: dict[str, list[str]] = field(default_factory=dict)  # key -> the shared stages it needs


def plan_units(graph: dict[str, list[str]], entries: dict[str, str] | None = None) -> Plan:
    """Split DVC's stage graph ({stage: deps}, topological) into shared stages, units and the rest.

    A chain unit is every stage of one arm and seed (DVC item `ARM-SEED` of the align, reliance,
    finetune, merge, evaluate families). Shared: every stage some chain depends on. Final: every
    stage that depends on a chain (it needs all of them). Any other stage is a unit of its own.
    """
    def family(stage: str) -> str:
        """The registry stage a DVC stage runs (`entries`, from dvc.yaml's commands); without them, read
        off the name (`align_proxy@dpa-0` -> `align`)."""
        return (entries or {}).get(stage) or stage.split("@", 1)[0].removesuffix("_proxy")

    def chain_key(stage: str) -> str | None:
        if "@" in stage and family(stage) in CHAIN_FAMILIES:
            return stage.split("@", 1)[1]
        return None

    ancestors: dict[str, set[str]] = {}
    for stage, deps in graph.items():  # topological order: deps first
        ancestors[stage] = set(deps).union(*(ancestors[d] for d in deps)) if deps else set()
    chains = {s for s in graph if chain_key(s)}
    shared_set = set().union(*(ancestors[s] for s in chains)) - chains if chains else set()
    plan = Plan()
    side: dict[str, list[str]] = {}
    for stage in graph:
        if stage in chains:
            plan.units.setdefault(chain_key(stage), []).append(stage)
        elif stage in shared_set:
            plan.shared.append(stage)
        elif ancestors[stage] & chains:
            plan.final.append(stage)
        else:
            side[stage.replace("@", "-")] = [stage]
    for key, stages in plan.units.items():  # a chain never depends on another chain
        for s in stages:
            other = {chain_key(a) for a in ancestors[s] & chains} - {key}
            if other:
                raise ScaleoutError(f"stage {s!r} depends on the stages of {sorted(other)}: the chains of dvc.yaml "
                                    "are not independent, so they cannot run in separate workspaces.")
    plan.units.update(side)  # chains first: they are the long ones
    for key, stages in plan.units.items():
        needed = set().union(*(ancestors[s] for s in stages))
        plan.inputs[key] = [s for s in plan.shared if s in needed]
    return plan


# ---- DVC commands, streamed ------------------------------------------------------------------------

def run_dvc(args: list[str], cwd: Path, env: dict[str, str], logger, label: str) -> list[str]:
    """`dvc ARGS` in `cwd` under pipelines/supervisor.py (its own process group; a
    killed flow run never leaves the stage command running); output streamed into `logger`.
    Returns the output lines; raises StageFailed(label) with the tail of the output on failure."""
    cmd = [sys.executable, str(SUPERVISOR), str(os.getpid()), sys.executable, "-m", "dvc", *args]
    logger.info("$ dvc %s   (in %s)", " ".join(args), cwd)
    lines: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                lines.append(line)
                tail.append(line)
                logger.info("[%s] %s", label, line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            _kill(proc)
    if rc != 0:
        raise StageFailed(label, rc, "\n".join(tail), input_error=any(INPUT_ERROR_MARK in x for x in tail))
    return lines


def _git(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise ScaleoutError(f"`git {' '.join(args)}` failed in {cwd} (exit {res.returncode}): "
                            f"{(res.stderr or res.stdout).strip()}")
    return res.stdout.strip()


# ---- workspaces ------------------------------------------------------------------------------------

def snapshot(root: Path) -> str:
    """A commit of the checkout as it is on disk (tracked + untracked-not-ignored files), made with a
    temporary index; no branch, no index, no file of the checkout changes. Workers check it out."""
    if not (root / ".git").exists():
        raise ScaleoutError(f"{root} is not the top of a git repository; the workers are git worktrees of it. "
                            "Fix: run from the repository root (git clone, or git init && git add -A && git commit).")
    fd, index = tempfile.mkstemp(prefix="dpa-workers-index-")
    os.close(fd)
    os.unlink(index)
    env = dict(os.environ, GIT_INDEX_FILE=index, GIT_AUTHOR_NAME="dpa workers", GIT_AUTHOR_EMAIL="dpa@localhost",
               GIT_COMMITTER_NAME="dpa workers", GIT_COMMITTER_EMAIL="dpa@localhost")
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip()
        _git(["add", "-A", "."], root, env)
        tree = _git(["write-tree"], root, env)
        return _git(["commit-tree", tree, *(["-p", head] if head else []), "-m", "dpa workers: workspace snapshot"],
                    root, env)
    finally:
        if os.path.exists(index):
            os.unlink(index)


def shared_dvc_config(root: Path) -> str:
    """`.dvc/config.local` for a worker: the main checkout's cache dir, and its remotes with their
    paths absolute (a relative `url` is relative to the config file, which moves with the worktree)."""
    from configobj import ConfigObj
    from dvc.config import Config

    cfg = Config(dvc_dir=str(root / ".dvc"))
    cache_dir = cfg["cache"].get("dir") or str(root / ".dvc" / "cache")
    out = ConfigObj()
    out["cache"] = {"dir": str(Path(cache_dir).resolve())}
    for name, opts in cfg["remote"].items():
        out[f'remote "{name}"'] = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in opts.items()}
    if cfg["core"].get("remote"):
        out["core"] = {"remote": cfg["core"]["remote"]}
    return "\n".join(out.write()) + "\n"


def workspace_path(root: Path, key: str) -> Path:
    return root / WORKSPACES / re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def prepare_workspace(root: Path, key: str, commit: str, config_local: str) -> Path:
    """The unit's worktree at `commit`: created, or (kept from a failed run) moved to `commit` with
    its ignored files (outputs, checkpoints to resume from) left in place."""
    ws = workspace_path(root, key)
    if (ws / ".git").exists():
        _git(["checkout", "-q", "-f", "--detach", commit], ws)
        _git(["clean", "-q", "-f", "-d"], ws)  # untracked, not ignored: not in the snapshot
    else:
        if ws.exists():
            shutil.rmtree(ws)
        ws.parent.mkdir(parents=True, exist_ok=True)
        _git(["worktree", "prune"], root)
        _git(["worktree", "add", "-q", "-f", "--detach", str(ws), commit], root)
    tmp = ws / ".dvc" / "config.local.tmp"
    tmp.write_text(config_local)
    os.replace(tmp, ws / ".dvc" / "config.local")
    return ws


def remove_workspace(root: Path, ws: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(ws)], cwd=root, capture_output=True)
    shutil.rmtree(ws, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def worker_env(root: Path, ws: Path, flow_run_id: str | None = None) -> dict[str, str]:
    """A worker's environment: the workspace's code first on PYTHONPATH, and MLflow pointed at the
    main checkout's store (the default SQLite path is relative to the checkout) unless set."""
    env = stage_env(flow_run_id)
    env["PYTHONPATH"] = os.pathsep.join([str(ws), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if not env.get("MLFLOW_TRACKING_URI"):
        uri = load_params(root / PARAMS_FILE).tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str((root / uri[len("sqlite:///"):]).resolve())
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def check_remote(root: Path, push: str) -> str | None:
    """The default DVC remote's URL, or None when `push` is never; a clear error when there is none."""
    if push not in PUSH_CHOICES:
        raise ScaleoutError(f"--push {push!r}: choose one of {', '.join(PUSH_CHOICES)}.")
    if push == "never":
        return None
    from dvc.config import Config

    cfg = Config(dvc_dir=str(root / ".dvc"))
    name = cfg["core"].get("remote")
    if not name or name not in cfg["remote"]:
        raise ScaleoutError("no default DVC remote to push to (core.remote in .dvc/config). Fix: "
                            "`dvc remote add -d store /path/outside/the/repo` (or s3://..., gs://..., ssh://...; "
                            "docs/scaleout.md), or --push never.")
    return str(cfg["remote"][name]["url"])


# ---- Prefect tasks and the flow --------------------------------------------------------------------

def _push(stages: list[str], cwd: Path, env: dict[str, str], logger, label: str) -> None:
    run_dvc(["push", "--run-cache", *stages], cwd, env, logger, f"{label} push")


@task(name="shared-stage", cache_policy=NO_CACHE, persist_result=False)
def shared_stage(stage: str, root: str, push: str) -> dict[str, Any]:
    """One shared stage in the main checkout (`dvc repro --single-item`), pushed when push=stage."""
    from prefect.runtime import flow_run

    log, r = get_run_logger(), Path(root)
    env = stage_env(flow_run.id)
    t0 = time.time()
    run_dvc(["--wait-for-lock", "repro", "--single-item", stage], r, env, log, stage)
    if push == "stage":
        _push([stage], r, env, log, stage)
    return {"stage": stage, "start": t0, "end": time.time()}


@task(name="unit", cache_policy=NO_CACHE, persist_result=False)
def run_unit(key: str, stages: list[str], inputs: list[str], root: str, commit: str, config_local: str,
             push: str) -> dict[str, Any]:
    """One unit (an arm and seed's chain) in its own worktree: the outputs of the shared stages it
    needs checked out of the shared cache (`dvc checkout STAGE...`: their dvc.lock entries came with
    the snapshot), then `dvc repro --single-item` per stage, each pushed when push=stage. The
    worktree is removed when the unit succeeds, kept otherwise."""
    from prefect.runtime import flow_run

    log, r = get_run_logger(), Path(root)
    t0 = time.time()
    ws = prepare_workspace(r, key, commit, config_local)
    env = worker_env(r, ws, flow_run.id)
    times = {}
    if inputs:
        run_dvc(["checkout", *inputs], ws, env, log, f"unit {key} inputs")
    for stage in stages:
        s0 = time.time()
        run_dvc(["repro", "--single-item", stage], ws, env, log, stage)
        if push == "stage":
            _push([stage], ws, env, log, stage)
        times[stage] = [s0, time.time()]
    remove_workspace(r, ws)
    return {"unit": key, "stages": times, "start": t0, "end": time.time()}


@task(name="fold-back", cache_policy=NO_CACHE, persist_result=False)
def fold_back(root: str, push: str) -> dict[str, Any]:
    """`dvc repro` in the main checkout: every unit's stages restored from the run-cache, the final
    stages (compare, curves) run; then `dvc push --run-cache` unless push=never."""
    from prefect.runtime import flow_run

    log, r = get_run_logger(), Path(root)
    env = stage_env(flow_run.id)
    t0 = time.time()
    lines = run_dvc(["--wait-for-lock", "repro"], r, env, log, "fold-back")
    ran = [m.group(1) for x in lines if (m := re.search(r"Running stage '([^']+)'", x))]
    restored = [m.group(1) for x in lines if (m := re.search(r"Stage '([^']+)' is cached - skipping run", x))]
    if push != "never":
        _push([], r, env, log, "study")
        p = load_params(r / PARAMS_FILE)
        if p.tracking.log_checkpoints:
            log.warning("merged checkpoints are now stored twice: in the DVC remote and as MLflow artifacts "
                        "(tracking.log_checkpoints: true). Set tracking.log_checkpoints: false to keep only their "
                        "reference in MLflow (the merge run's tag dpa.checkpoint_path; the object ids are in "
                        "dvc.lock).")
    return {"ran": ran, "restored": restored, "start": t0, "end": time.time()}


@flow(name=FLOW_NAME, persist_result=False,
      description="The DPA study with its arm x seed chains side by side, each in its own DVC workspace (git "
                  "worktree) sharing one DVC cache; shared stages once; outputs pushed to the DVC remote.")
def dpa_study_parallel(workers: int = 2, push: str = "end", profile: str | None = None,
                       proxy_arms: list[str] | None = None, plain_arms: list[str] | None = None,
                       seeds: list[int] | None = None, overrides: dict[str, Any] | None = None,
                       project_dir: str = ".") -> dict[str, Any]:
    """Run the study with `workers` units at once (the task runner's max_workers is set by `run`).

    Args:
        workers: units (arm x seed chains) at once; informational here, see `run`.
        push: end (one `dvc push --run-cache` after the fold-back), stage (after every stage, from
            the workspace that ran it) or never.
        profile, proxy_arms, plain_arms, seeds, overrides: as the dpa-study flow.
        project_dir: the repository root.
    """
    log = get_run_logger()
    root = Path(project_dir).resolve()
    remote = check_remote(root, push)
    ov = build_overrides(profile, proxy_arms, plain_arms, seeds, overrides)
    p = apply_params(root, ov)
    graph = stage_graph(root)
    plan = plan_units(graph, stage_entries(root))
    log.info("profile %s; %d shared stages, %d units with %d at once, %d final; push: %s%s", p.profile,
             len(plan.shared), len(plan.units), workers, len(plan.final), push, f" to {remote}" if remote else "")
    t0 = time.time()
    prev = None
    for stage in plan.shared:  # in order, each waits for the one before
        prev = shared_stage.with_options(task_run_name=stage).submit(stage, str(root), push,
                                                                     wait_for=[prev] if prev else [])
    if prev is not None:
        prev.result()  # a failed shared stage fails the run here (no unit can run without it)
    commit = snapshot(root)  # after the shared stages: their dvc.lock entries travel with it
    config_local = shared_dvc_config(root)
    futures = {key: run_unit.with_options(task_run_name=f"unit {key}").submit(
        key, stages, plan.inputs[key], str(root), commit, config_local, push) for key, stages in plan.units.items()}
    wait(list(futures.values()))
    failed = {}
    units = {}
    for key, fut in futures.items():
        if fut.state.is_completed():
            units[key] = fut.result()
        else:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - the unit's own error is the message
                failed[key] = e
            else:
                failed[key] = RuntimeError(fut.state.message or fut.state.name)
    if failed:
        first, err = next(iter(failed.items()))
        raise StudyFailed(f"{len(failed)} of {len(plan.units)} units failed ({', '.join(failed)}); the others "
                          f"finished and are in the shared DVC cache. Their workspaces are kept under {WORKSPACES}; "
                          f"run again to resume them. The first error ({first}): {err}")
    final = fold_back.submit(str(root), push).result()
    total = time.time() - t0
    log.info("study finished in %.0f s with %d workers: %d units; fold-back restored %d stages from the run-cache "
             "and ran %s", total, workers, len(units), len(final["restored"]), final["ran"] or "nothing")
    return {"seconds": total, "units": units, "fold_back": final, "plan": plan.__dict__, "remote": remote}


def run(workers: int = 2, **kwargs) -> Any:
    """The flow with `workers` units at once (Prefect's ThreadPoolTaskRunner); returns its state."""
    if workers < 1:
        raise ScaleoutError(f"--workers {workers}: give 1 or more.")
    f = dpa_study_parallel.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
    from prefect.settings import temporary_settings

    with temporary_settings(set_defaults={"server.ephemeral.startup_timeout_seconds": 120}):
        return f(workers=workers, return_state=True, **kwargs)


def _csv(text: str, typ=str) -> list:
    return [typ(x) for x in text.replace(" ", "").split(",") if x]


def cli(argv: list[str] | None = None) -> int:
    """`dpa workers ...`: the study with its chains in parallel workspaces."""
    import logging

    ap = argparse.ArgumentParser(prog="dpa workers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="units (arm x seed chains) at once (default 2)")
    ap.add_argument("--push", choices=PUSH_CHOICES, default="end",
                    help="when outputs go to the default DVC remote (default: end)")
    ap.add_argument("--profile")
    ap.add_argument("--proxy-arms", type=_csv)
    ap.add_argument("--plain-arms", type=_csv)
    ap.add_argument("--seeds", type=lambda s: _csv(s, int))
    ap.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", default=[])
    ap.add_argument("--project-dir", default=".")
    args = ap.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        check_remote(Path(args.project_dir).resolve(), args.push)  # before Prefect starts
    except ScaleoutError as e:
        print(f"[dpa] error: {e}", file=sys.stderr, flush=True)
        return 2
    state = run(args.workers, push=args.push, profile=args.profile, proxy_arms=args.proxy_arms,
                plain_arms=args.plain_arms, seeds=args.seeds,
                overrides=dict(parse_override(s) for s in args.set) or None, project_dir=args.project_dir)
    if not state.is_completed():
        print(f"[dpa] flow run {state.name}: {state.message}", file=sys.stderr, flush=True)
        return 1
    res = state.result()
    print(f"[dpa] study finished in {res['seconds']:.0f} s with {args.workers} workers", flush=True)
    return 0


if __name__ == "__main__":
    from pipelines.workers import cli as _cli

    sys.exit(_cli(sys.argv[1:]))
