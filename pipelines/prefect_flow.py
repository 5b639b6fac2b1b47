"""The DPA study as a Prefect 3 flow over the DVC pipeline: one Prefect task per DVC stage.

Prefect orchestrates, DVC computes and caches. The flow

1. validates its parameters with the rules of params.yaml (`pipelines.params.load_params`); a bad
   value fails the flow run before any stage runs, with the message (nearest valid key, fix) shown;
2. writes params.yaml the way `dvc exp run -S key=value` does (Hydra: conf/ composed with the
   profile and the overrides, atomic replace), so DVC decides what is stale exactly as for `dvc repro`;
3. reads the stage graph from DVC's own index (pipelines/dvc_runner.py: the stages of `dvc stage
   list`, their dependencies, and the registry stage each runs), so it never drifts from dvc.yaml;
4. submits one task per DVC stage (`world`, `mix`, `proxy@0`, `align_proxy@dpa-0`, ...) in
   dependency order; each task runs `dvc repro --single-item STAGE` (pipelines/dvc_runner.py, under
   pipelines/supervisor.py), retried where the stage registry says so, streams its output into the
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

import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.dvc_runner import StageFailed, run_dvc_stage, stage_entries, stage_env, stage_graph  # noqa: F401
from pipelines.entrypoints import STAGES, expected_stages
from pipelines.params import CONF_DIR, Params, build, compose, flatten, load_params, parse_override, write_params

FLOW_NAME = "dpa-study"
DEPLOYMENT_NAME = "local"
PARAMS_FILE = "params.yaml"

RETRIES = int(os.environ.get("DPA_PREFECT_RETRIES", "2"))
RETRY_DELAY_SECONDS = [int(s) for s in os.environ.get("DPA_PREFECT_RETRY_DELAYS", "30,120").split(",")]


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
    for key, value in flatten(overrides or {}).items():
        if isinstance(value, str):
            value = parse_override(f"{key}={value}")[1]
        out[key] = value
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


# ---- one task per DVC stage ----------------------------------------------------------------------

def _retry_unless_input_error(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    return not getattr(exc, "input_error", False)


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, project_dir: str) -> dict[str, Any]:
    """One DVC stage: `dvc repro --single-item STAGE`; DVC skips it when it is up to date."""
    from prefect.runtime import flow_run

    return run_dvc_stage(stage, project_dir, get_run_logger(), flow_run_id=flow_run.id)


def stage_task(stage: str, entry: str):
    """The Prefect task for one DVC stage that runs `dpa stage ENTRY`: named after the registry
    stage, the run after the DVC stage; retries where the registry says a failure may be transient
    (never for bad input)."""
    retry = STAGES[entry].retry
    return dvc_stage.with_options(
        name=entry, task_run_name=stage, tags=["dvc", f"stage:{entry}"],
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
def read_stage_graph(project_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The DVC stage graph, checked against the validated settings (they must name the same stages)."""
    graph = stage_graph(project_dir)
    p = validate(project_dir, {})
    # the arm/seed stages DVC expanded must be the study's (dvc.yaml and the registry agree)
    entries = stage_entries(project_dir)
    got = {s for s in graph if (st := STAGES.get(entries[s])) is not None and (st.arm or st.seed)}
    want = {s for s in expected_stages(p) if "@" in s}
    if got != want:
        raise RuntimeError(f"dvc.yaml's arm/seed stages do not match the study in params.yaml: missing "
                           f"{sorted(want - got)}, unexpected {sorted(got - want)}.")
    get_run_logger().info("%d DVC stages: %s", len(graph), ", ".join(graph))
    return {"graph": graph, "entries": entries}


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
    pipeline = read_stage_graph(root, settings)
    graph, entries = pipeline["graph"], pipeline["entries"]

    futures = {}
    for stage, deps in graph.items():  # topological: every dependency is submitted first
        futures[stage] = stage_task(stage, entries[stage]).submit(stage, root, wait_for=[futures[d] for d in deps])
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


def serve(name: str = DEPLOYMENT_NAME, project_dir: str = ".", limit: int = 1) -> None:
    """Register the deployment `dpa-study/<name>` and execute the runs the UI schedules for it."""
    from prefect.types.entrypoint import EntrypointType

    root = str(Path(project_dir).resolve())
    current_profile = load_params(Path(root) / PARAMS_FILE).profile
    dpa_study.serve(
        name=name, parameters={"project_dir": root, "profile": current_profile}, limit=limit,
        pause_on_shutdown=False, tags=["dpa", "dvc"], entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"The DPA study in {root}: one task per DVC stage; DVC's cache is the only cache.")


if __name__ == "__main__":
    # `python -m pipelines.prefect_flow [serve]` is `dpa flow [serve]` (pipelines/cli.py); imported
    # under the package name, so the deployment's entrypoint is pipelines.prefect_flow.dpa_study
    from pipelines.cli import main as _main

    sys.exit(_main(["flow", *sys.argv[1:]]))
