"""The DPA study as a Prefect 3 flow over the DVC pipeline: one Prefect task per DVC stage.

Prefect orchestrates, DVC computes and caches. The flow

1. validates its parameters with the rules of params.yaml (`pipelines.params.load_params`); a bad
   value fails the flow run before any stage runs, with the message (nearest valid key, fix) shown;
2. writes params.yaml the way `dvc exp run -S key=value` does (Hydra: conf/ composed with the
   profile and the overrides, atomic replace), so DVC decides what is stale exactly as for `dvc repro`;
3. reads the stage graph from DVC itself (`dvc dag --dot`: the stage names of `dvc stage list` and
   their dependencies), so it never drifts from dvc.yaml;
4. submits one task per DVC stage (`world`, `mix`, `proxy@0`, `align_proxy@dpa-0`, ...) in
   dependency order; each task runs `dvc repro --single-item STAGE`, streams its output into the
   task's log, and leaves the result in DVC's cache and dvc.lock: ONE cache, shared with `dvc repro`
   (a stage computed by either is skipped by the other: "Stage '...' didn't change, skipping").

Concurrency: tasks wait for their DVC dependencies (`wait_for`), so independent arms and seeds may
overlap. By default at most one stage runs at a time (`DPA_PREFECT_MAX_PARALLEL=1`): the stages
share one machine (CPU cores or GPUs), and several arms training at once only slow each other
down. Raise it on a machine with room for several stages at once; DVC releases its repository
lock while a stage command runs and each task passes `--wait-for-lock`, so parallel
`dvc repro --single-item` calls of independent stages are safe. A failed stage stops only the
stages that depend on it; the other arms go on, and the flow run ends Failed with the failed
stage's error (the tail of its output) as its message.

Entry points:
    dpa flow [--profile smoke] [--proxy-arms dpa] [--plain-arms vanilla,cal] [--seeds 0,1] [-S k=v ...]
        run the flow once, in this process (against PREFECT_API_URL, or Prefect's ephemeral API)
    dpa flow serve  |  python -m pipelines.prefect_flow serve
        register the deployment `dpa-study/local` and run what the UI's "Run" button schedules
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.params import CONF_DIR, Params, ParamsError, build, compose, load_params, parse_override, write_params

FLOW_NAME = "dpa-study"
DEPLOYMENT_NAME = "local"
PARAMS_FILE = "params.yaml"

#: stage families (the DVC stage name before "@", without the "_proxy" split) that may fail for
#: transient reasons (out of memory, a preempted GPU, a flaky filesystem): retried by Prefect.
RETRY_FAMILIES = frozenset({"proxy", "align", "finetune", "evaluate", "evaluate_reference"})
RETRIES = int(os.environ.get("DPA_PREFECT_RETRIES", "2"))
RETRY_DELAY_SECONDS = [int(s) for s in os.environ.get("DPA_PREFECT_RETRY_DELAYS", "30,120").split(",")]
TAIL_LINES = 40
#: what `dpa` prints for a DPAInputError (bad data or config): deterministic, never retried.
INPUT_ERROR_MARK = "[dpa] error:"
SKIPPED_RE = re.compile(r"Stage '([^']+)' didn't change, skipping")


class StageFailed(RuntimeError):
    """A DVC stage failed; the message carries the tail of its output."""

    def __init__(self, stage: str, returncode: int, tail: str, input_error: bool = False):
        self.stage, self.returncode, self.tail, self.input_error = stage, returncode, tail, input_error
        kind = "bad input (not retried)" if input_error else f"dvc repro exited with {returncode}"
        super().__init__(f"DVC stage {stage!r} failed ({kind}). Last lines of its output:\n{tail}")

    def __reduce__(self):  # picklable with all fields (Prefect may serialise exceptions)
        return (type(self), (self.stage, self.returncode, self.tail, self.input_error))


class StudyFailed(RuntimeError):
    """One or more stages failed; the message names them and carries the first one's error."""


# ---- parameters ---------------------------------------------------------------------------------

def build_overrides(profile: str | None = None, proxy_arms: list[str] | None = None,
                    plain_arms: list[str] | None = None, seeds: list[int] | None = None,
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flow's arguments as `dvc exp run -S` style overrides: {'dotted.key': value}.

    None keeps what params.yaml says. `overrides` uses dotted keys ({"proxy.lora.r": 64}); nested
    mappings are flattened ({"proxy": {"lora": {"r": 64}}} is the same); a string value given for a
    dotted key is YAML-typed as on the command line ("64" -> 64, "[0, 1]" -> [0, 1]).
    """
    out: dict[str, Any] = {}
    if profile is not None:
        out["profile"] = profile
    if proxy_arms is not None:
        out["study.proxy_arms"] = list(proxy_arms)
    if plain_arms is not None:
        out["study.plain_arms"] = list(plain_arms)
    if seeds is not None:
        out["study.seeds"] = list(seeds)
    for key, value in _flatten(overrides or {}).items():
        if isinstance(value, str):
            value = parse_override(f"{key}={value}")[1]
        out[key] = value
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def validate(project_dir: str | Path, overrides: dict[str, Any]) -> Params:
    """params.yaml (+ profile) with the overrides applied, validated; raises ParamsError."""
    return load_params(Path(project_dir) / PARAMS_FILE, overrides)


def apply_params(project_dir: str | Path, overrides: dict[str, Any]) -> Params:
    """Validate the overrides, then write params.yaml as `dvc exp run -S` does with Hydra: conf/
    composed with the profile and the overrides (overrides win over the profile), replaced atomically.
    No overrides: params.yaml as it is (as `dvc repro`). Raises ParamsError, and leaves params.yaml
    untouched, when the overrides are invalid."""
    root = Path(project_dir)
    if not overrides:
        return validate(root, {})
    data = compose(root / CONF_DIR, overrides)
    want = build(Params, data)
    write_params(root / PARAMS_FILE, data)
    return want


# ---- the stage graph, from DVC ------------------------------------------------------------------

def _dvc(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env or stage_env(), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {res.returncode}):\n"
                           f"{(res.stderr or res.stdout).strip()}")
    return res.stdout


_NODE = re.compile(r'^\s*"([^"]+)"\s*;\s*$')
_EDGE = re.compile(r'^\s*"([^"]+)"\s*->\s*"([^"]+)"\s*;\s*$')


def stage_graph(project_dir: str | Path) -> dict[str, list[str]]:
    """{stage: [the stages it depends on]} for every stage of dvc.yaml, in topological order.

    Stages and edges come from `dvc dag --dot` (names as `dvc stage list` prints them); ties keep
    the order of `dvc stage list`, i.e. of dvc.yaml.
    """
    root = Path(project_dir)
    names = _dvc(["stage", "list", "--name-only"], root).split()
    deps: dict[str, list[str]] = {n: [] for n in names}
    for line in _dvc(["dag", "--dot"], root).splitlines():
        if m := _EDGE.match(line):
            src, dst = m.groups()  # src must run before dst
            deps.setdefault(dst, []).append(src)
            deps.setdefault(src, [])
        elif m := _NODE.match(line):
            deps.setdefault(m.group(1), [])
    if set(deps) != set(names):
        raise RuntimeError(f"`dvc dag` and `dvc stage list` disagree: {sorted(set(deps) ^ set(names))}")
    return _toposort(deps, names)


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


def expected_stages(p: Params) -> list[str]:
    """The DVC stage names dvc.yaml yields for validated params (same naming as DVC's matrix)."""
    s = p.study
    out = ["world", "mix", *[f"proxy@{x}" for x in s.seeds], *[f"diagnose@{x}" for x in s.seeds]]
    for family in ("align", "reliance", "finetune", "merge", "evaluate"):
        out += [f"{family}_proxy@{a}-{x}" for a in s.proxy_arms for x in s.seeds]
        out += [f"{family}@{a}-{x}" for a in s.plain_arms for x in s.seeds]
    return out + ["evaluate_reference", "compare", "curves"]


def stage_family(stage: str) -> str:
    """`align_proxy@dpa-0` -> `align`; `evaluate_reference` -> `evaluate_reference`."""
    base = stage.split("@", 1)[0]
    return base[: -len("_proxy")] if base.endswith("_proxy") else base


# ---- one task per DVC stage ----------------------------------------------------------------------

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


# `dvc repro` runs under this small supervisor, in a process group of its own. When the flow run
# is cancelled or crashes, Prefect kills the flow-run process; DVC would then die without stopping
# the stage command it started (a training job left running on the GPU). The supervisor stops the
# whole group instead: when it is signalled (SIGTERM/SIGINT), and, on Linux, when the flow-run
# process that started it dies (PR_SET_PDEATHSIG).
_SUPERVISOR = r"""
import ctypes, os, signal, subprocess, sys, time
parent, stopping = int(sys.argv[1]), []
def on_signal(*_):
    stopping.append(time.monotonic())
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
except Exception:
    pass
child, sent = subprocess.Popen(sys.argv[2:]), False
while True:
    try:
        rc = child.wait(timeout=0.5)
        break
    except subprocess.TimeoutExpired:
        pass
    if os.getppid() != parent and not stopping:  # the flow-run process is gone
        stopping.append(time.monotonic())
    if stopping and not sent:
        sent = True
        os.killpg(0, signal.SIGTERM)
    if stopping and time.monotonic() - stopping[0] > 15:
        os.killpg(0, signal.SIGKILL)
if stopping:
    os.killpg(0, signal.SIGKILL)  # whatever the stage command left behind
sys.exit(rc)
"""


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
    cmd = [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), sys.executable, *dvc]
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


def _retry_unless_input_error(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    return not getattr(exc, "input_error", False)


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, project_dir: str) -> dict[str, Any]:
    """One DVC stage: `dvc repro --single-item STAGE`; DVC skips it when it is up to date."""
    from prefect.runtime import flow_run

    return run_dvc_stage(stage, project_dir, get_run_logger(), flow_run_id=flow_run.id)


def stage_task(stage: str):
    """The Prefect task for one DVC stage: named after its family, the run after the stage;
    retries for training and evaluation (never for bad input)."""
    family = stage_family(stage)
    retry = family in RETRY_FAMILIES
    return dvc_stage.with_options(
        name=family, task_run_name=stage, tags=["dvc", f"stage:{family}"],
        retries=RETRIES if retry else 0, retry_delay_seconds=RETRY_DELAY_SECONDS if retry else 0,
        retry_condition_fn=_retry_unless_input_error if retry else None)


@task(name="validate-params", task_run_name="validate-params", cache_policy=NO_CACHE, persist_result=False,
      retries=0)
def validate_params(project_dir: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate the run's settings (params.yaml rules) and write them into params.yaml."""
    log = get_run_logger()
    p = apply_params(project_dir, overrides)
    log.info("params OK (profile %s; arms %s; seeds %s); overrides written to params.yaml: %s",
             p.profile, p.study.arms, p.study.seeds, overrides or "none")
    return {"profile": p.profile, "proxy_arms": p.study.proxy_arms, "plain_arms": p.study.plain_arms,
            "seeds": p.study.seeds, "outputs": p.runtime.outputs}


@task(name="dvc-stage-graph", task_run_name="dvc-stage-graph", cache_policy=NO_CACHE, persist_result=False,
      retries=0)
def read_stage_graph(project_dir: str, settings: dict[str, Any]) -> dict[str, list[str]]:
    """The DVC stage graph, checked against the validated settings (they must name the same stages)."""
    graph = stage_graph(project_dir)
    p = validate(project_dir, {})
    # the arm/seed stages DVC expanded must be the study's (a study.* value set in a profile is not
    # seen by dvc.yaml, which reads params.yaml only); other stages of dvc.yaml are not checked
    families = {"proxy", "diagnose", "align", "reliance", "finetune", "merge", "evaluate"}
    got = {s for s in graph if "@" in s and stage_family(s) in families}
    want = {s for s in expected_stages(p) if "@" in s}
    if got != want:
        raise RuntimeError(f"dvc.yaml's arm/seed stages do not match the study in params.yaml: missing "
                           f"{sorted(want - got)}, unexpected {sorted(got - want)}. dvc.yaml reads params.yaml "
                           "only: set study.* there or as flow parameters, not in a profile.")
    get_run_logger().info("%d DVC stages: %s", len(graph), ", ".join(graph))
    return graph


# ---- the flow ------------------------------------------------------------------------------------

def _max_parallel() -> int:
    return max(1, int(os.environ.get("DPA_PREFECT_MAX_PARALLEL", "1")))


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=_max_parallel()), persist_result=False,
      description="The DPA study (DPA vs Vanilla): every DVC stage of dvc.yaml as one task; DVC's cache is the "
                  "only cache, so stages already computed (by `dvc repro` or an earlier run) are skipped.")
def dpa_study(profile: str = "toy", proxy_arms: list[str] | None = None, plain_arms: list[str] | None = None,
              seeds: list[int] | None = None, overrides: dict[str, Any] | None = None,
              project_dir: str = ".") -> dict[str, Any]:
    """Run the DPA study: validate the settings, write them into params.yaml, run each DVC stage.

    Args:
        profile: conf/profile/<profile>.yaml over conf/config.yaml: toy (default), smoke (CI size),
            qwen2.5-7b, llama3.1-8b, gemma2-9b.
        proxy_arms: arms with proxy: true to run, e.g. ["dpa"] (unset: keep params.yaml's).
        plain_arms: arms with proxy: false to run, e.g. ["vanilla", "cal"] (unset: keep params.yaml's).
        seeds: study seeds, e.g. [0, 1, 2] (unset: keep params.yaml's).
        overrides: any other setting as {"dotted.key": value}, as `dvc exp run -S`,
            e.g. {"proxy.lora.r": 64, "evaluate.limit": 100}.
        project_dir: the repository (its params.yaml, dvc.yaml and DVC cache).
    """
    log = get_run_logger()
    root = str(Path(project_dir).resolve())
    # validation: fails the run (with the nearest-key message) before any stage runs
    ov = build_overrides(profile, proxy_arms, plain_arms, seeds, overrides)
    settings = validate_params(root, ov)
    graph = read_stage_graph(root, settings)

    futures = {}
    for stage, deps in graph.items():  # topological: every dependency is submitted first
        futures[stage] = stage_task(stage).submit(stage, root, wait_for=[futures[d] for d in deps])
    wait(list(futures.values()))

    ran, skipped, failed, not_run = [], [], {}, []
    for stage, fut in futures.items():
        state = fut.state
        if state.is_completed():
            (skipped if fut.result()["skipped"] else ran).append(stage)
        elif state.is_failed() or state.is_crashed():
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - the stage's own error is the message
                failed[stage] = e
            else:
                failed[stage] = RuntimeError(state.message or state.name)
        else:
            not_run.append(stage)
    log.info("DVC ran %d of %d stages; %d up to date (skipped by DVC)%s%s", len(ran), len(graph), len(skipped),
             f"; failed: {', '.join(failed)}" if failed else "",
             f"; not run (upstream failed): {', '.join(not_run)}" if not_run else "")
    if failed:
        first, err = next(iter(failed.items()))
        msg = str(err) if len(failed) == 1 else f"{len(failed)} stages failed ({', '.join(failed)}); the first: {err}"
        if not_run:
            msg += f"\nNot run (a stage they depend on failed): {', '.join(not_run)}."
        raise StudyFailed(msg)

    compare_md = Path(root) / settings["outputs"] / "compare" / "comparison.md"
    if compare_md.is_file():
        _artifact(compare_md.read_text())
    return {"ran": ran, "skipped": skipped, "stages": list(graph), "comparison": str(compare_md)}


def _artifact(markdown: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key="dpa-comparison", description="DPA vs Vanilla (outputs/compare)")
    except Exception as e:  # noqa: BLE001 - an artifact is a convenience, never a failure
        get_run_logger().warning("could not create the comparison artifact: %s", e)


# ---- command line --------------------------------------------------------------------------------

def _csv(text: str, typ=str) -> list:
    return [typ(x) for x in text.replace(" ", "").split(",") if x]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dpa flow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=["run", "serve"], default="run",
                    help="run: the flow once, in this process (default); serve: the deployment for the UI")
    ap.add_argument("--profile", help="conf/profile/<name>.yaml (default: conf/config.yaml's)")
    ap.add_argument("--proxy-arms", type=_csv, help="comma-separated, e.g. dpa,pmo_only")
    ap.add_argument("--plain-arms", type=_csv, help="comma-separated, e.g. vanilla,cal")
    ap.add_argument("--seeds", type=lambda s: _csv(s, int), help="comma-separated, e.g. 0,1,2")
    ap.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", default=[], help="override a setting")
    ap.add_argument("--project-dir", default=".", help="the repository root (default: .)")
    ap.add_argument("--name", default=DEPLOYMENT_NAME, help="serve: the deployment name (default: local)")
    ap.add_argument("--limit", type=int, default=1,
                    help="serve: flow runs at once (default 1: runs share params.yaml and the workspace)")
    return ap


def serve(name: str = DEPLOYMENT_NAME, project_dir: str = ".", limit: int = 1) -> None:
    """Register the deployment `dpa-study/<name>` and execute the runs the UI schedules for it."""
    from prefect.types.entrypoint import EntrypointType

    root = str(Path(project_dir).resolve())
    current_profile = load_params(Path(root) / PARAMS_FILE).profile
    dpa_study.serve(
        name=name, parameters={"project_dir": root, "profile": current_profile}, limit=limit,
        pause_on_shutdown=False, tags=["dpa", "dvc"], entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"The DPA study in {root}: one task per DVC stage; DVC's cache is the only cache.")


def cli(argv: list[str] | None = None) -> int:
    """`dpa flow ...`: run the flow once in-process, or `serve` the deployment."""
    import logging

    args = _parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API request otherwise
    if args.action == "serve":
        serve(args.name, args.project_dir, args.limit)
        return 0
    overrides = dict(parse_override(s) for s in args.set)
    profile = args.profile or load_params(Path(args.project_dir) / PARAMS_FILE).profile
    from prefect.settings import temporary_settings

    # without PREFECT_API_URL Prefect starts a temporary local server; give it time on a busy machine
    with temporary_settings(set_defaults={"server.ephemeral.startup_timeout_seconds": 120}):
        state = dpa_study(profile=profile, proxy_arms=args.proxy_arms, plain_arms=args.plain_arms, seeds=args.seeds,
                          overrides=overrides or None, project_dir=args.project_dir, return_state=True)
    if not state.is_completed():
        print(f"[dpa] flow run {state.name}: {state.message}", file=sys.stderr, flush=True)
        return 1
    print(f"[dpa] flow run completed: {state.result()}", flush=True)
    return 0


if __name__ == "__main__":
    # import under the package name, so the deployment's entrypoint is pipelines.prefect_flow.dpa_study
    from pipelines.prefect_flow import cli as _cli

    sys.exit(_cli(sys.argv[1:]))
