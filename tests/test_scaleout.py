"""Scale-out (pipelines/workers.py, docs/scaleout.md): the plan, the workspaces and the remote
(fast), then the smoke study with two workers against a serial `dvc repro` (slow): overlapping
chains, tensor-equal results, a fresh clone that pulls the study, and a worker killed mid-stage.

Everything runs against real git, DVC (a local-directory remote) and MLflow; the slow tests run the
real Prefect flow `dpa-study-parallel` in a temporary copy of the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_helpers import REPO, make_repo_copy, start, stop, subprocess_env, tail

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]


def _run(cmd, cwd, env=None, check=True, timeout=None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise AssertionError(f"{cmd} failed in {cwd} ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _dvc(args, cwd, env=None, check=True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env, check)


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    _run(["git", "init", "-q"], path)
    return path


def _commit(path: Path) -> None:
    _run([*GIT, "add", "-A"], path)
    _run([*GIT, "commit", "-qm", "init"], path)


# ---- fast: the plan ---------------------------------------------------------------------------------

def test_plan_from_dvcs_graph_shared_once_a_unit_per_chain():
    from pipelines.dvc_runner import stage_entries, stage_graph
    from pipelines.workers import plan_units

    plan = plan_units(stage_graph(REPO), stage_entries(REPO))  # params.yaml: dpa, vanilla and no_align, seed 0
    assert plan.shared == ["world", "mix", "proxy@0"]
    assert plan.units["dpa-0"] == ["align_proxy@dpa-0", "reliance_proxy@dpa-0", "finetune_proxy@dpa-0",
                                   "merge_proxy@dpa-0", "evaluate_proxy@dpa-0"]
    assert plan.units["vanilla-0"] == ["align@vanilla-0", "reliance@vanilla-0", "finetune@vanilla-0",
                                       "merge@vanilla-0", "evaluate@vanilla-0"]
    assert plan.units["diagnose-0"] == ["diagnose@0"] and plan.units["evaluate_reference"] == ["evaluate_reference"]
    assert list(plan.units)[:2] == ["dpa-0", "vanilla-0"]  # the long chains start first
    assert sorted(plan.final) == ["compare", "curves"]
    assert plan.inputs["dpa-0"] == ["world", "mix", "proxy@0"]
    assert plan.inputs["vanilla-0"] == ["world", "mix"]  # a plain arm never needs the proxy
    assert plan.inputs["evaluate_reference"] == ["world"]


def test_plan_refuses_chains_that_depend_on_each_other():
    from pipelines.workers import ScaleoutError, plan_units

    graph = {"world": [], "align@a-0": ["world"], "align@b-0": ["world"], "evaluate@b-0": ["align@b-0", "align@a-0"]}
    with pytest.raises(ScaleoutError, match=r"evaluate@b-0.*\['a-0'\].*not independent"):
        plan_units(graph)


# ---- fast: workspaces and the remote ----------------------------------------------------------------

def test_snapshot_is_the_checkout_on_disk_and_changes_nothing(tmp_path):
    from pipelines.workers import snapshot

    repo = _git_repo(tmp_path / "r")
    (repo / ".gitignore").write_text("ignored/\n")
    (repo / "a.txt").write_text("committed\n")
    _commit(repo)
    (repo / "a.txt").write_text("edited, not committed\n")
    (repo / "new.txt").write_text("untracked\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_text("ignored\n")
    head = _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    status = _run(["git", "status", "--porcelain"], repo).stdout

    commit = snapshot(repo)
    files = _run(["git", "ls-tree", "-r", "--name-only", commit], repo).stdout.split()
    assert sorted(files) == [".gitignore", "a.txt", "new.txt"]
    assert _run(["git", "show", f"{commit}:a.txt"], repo).stdout == "edited, not committed\n"
    assert _run(["git", "rev-parse", f"{commit}^"], repo).stdout.strip() == head
    # the branch, the index and the working tree are as they were
    assert _run(["git", "rev-parse", "HEAD"], repo).stdout.strip() == head
    assert _run(["git", "status", "--porcelain"], repo).stdout == status


def test_snapshot_outside_a_git_root_is_a_clear_error(tmp_path):
    from pipelines.workers import ScaleoutError, snapshot

    with pytest.raises(ScaleoutError, match="not the top of a git repository.*Fix"):
        snapshot(tmp_path)


def test_workspace_shares_the_cache_and_the_remote_of_the_checkout(tmp_path):
    from pipelines.workers import prepare_workspace, remove_workspace, shared_dvc_config, snapshot

    repo = _git_repo(tmp_path / "r")
    _dvc(["init", "-q"], repo)
    _dvc(["remote", "add", "-d", "store", "../remote-dir"], repo)  # stored relative to .dvc/, as the shipped one
    _commit(repo)
    ws = prepare_workspace(repo, "dpa-0", snapshot(repo), shared_dvc_config(repo))
    assert ws == repo / ".dvc" / "tmp" / "workers" / "dpa-0"
    assert Path(_dvc(["cache", "dir"], ws).stdout.strip()) == (repo / ".dvc" / "cache").resolve()
    remotes = _dvc(["remote", "list"], ws).stdout
    assert str((tmp_path / "remote-dir").resolve()) in remotes and "(default)" in remotes
    assert str(ws) in _run(["git", "worktree", "list"], repo).stdout
    # the main checkout does not see the workspace: git ignores it, DVC ignores .dvc/
    assert _run(["git", "status", "--porcelain"], repo).stdout == ""
    remove_workspace(repo, ws)
    assert not ws.exists() and str(ws) not in _run(["git", "worktree", "list"], repo).stdout


def test_push_without_a_remote_is_a_clear_error(tmp_path):
    from pipelines.workers import ScaleoutError, check_remote

    repo = _git_repo(tmp_path / "r")
    _dvc(["init", "-q"], repo)
    with pytest.raises(ScaleoutError, match=r"no default DVC remote.*dvc remote add -d.*--push never"):
        check_remote(repo, "end")
    assert check_remote(repo, "never") is None
    with pytest.raises(ScaleoutError, match=r"--push 'always': choose one of end, stage, never"):
        check_remote(repo, "always")


def test_the_shipped_default_remote_is_a_directory_outside_the_repository():
    from pipelines.workers import check_remote

    url = Path(check_remote(REPO, "end"))
    assert url == REPO.parent / "dpa-dvc-remote"
    assert REPO not in url.parents


def test_cli_refuses_push_without_remote_before_anything_runs(tmp_path):
    repo = _git_repo(tmp_path / "r")
    _dvc(["init", "-q"], repo)
    res = _run([sys.executable, "-m", "pipelines.workers", "--project-dir", str(repo)], REPO,
               subprocess_env(REPO), check=False)
    assert res.returncode == 2
    assert "[dpa] error: no default DVC remote" in res.stderr and "Traceback" not in res.stderr


def test_a_push_killed_half_way_leaves_no_partial_object_and_resumes(tmp_path):
    """DVC's local remote writes each object to a temporary name and renames it: `dvc push` killed
    (SIGKILL) half-way leaves only complete objects under their ids; pushing again completes the
    remote, and a fresh clone pulls verified data with a clean `dvc status`."""
    repo = _git_repo(tmp_path / "r")
    _dvc(["init", "-q"], repo)
    _dvc(["remote", "add", "-d", "store", "../remote"], repo)
    data = repo / "data"
    data.mkdir()
    rng = __import__("random").Random(0)
    for i in range(400):
        (data / f"{i:04d}.bin").write_bytes(rng.randbytes(64 * 1024))
    _dvc(["add", "-q", "data"], repo)
    _commit(repo)
    remote = tmp_path / "remote"
    total = 400 + 1  # the files and the directory object
    for attempt in range(3):  # the push must be caught half-way; a fast disk may finish first
        shutil.rmtree(remote, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-j", "1"], cwd=repo, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while proc.poll() is None and (not remote.exists() or len(_objects(remote)) < 20):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if len([p for p in _objects(remote) if not p.name.endswith(".tmp")]) < total:
            break
    else:
        pytest.skip("dvc push finished before it could be killed, three times")
    _assert_objects_verified(remote)
    assert "new:" in _dvc(["status", "--cloud"], repo).stdout  # the remote is incomplete, and says so
    _dvc(["push"], repo)
    assert _dvc(["status", "--cloud"], repo).stdout.strip().endswith("are in sync.")
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _dvc(["pull"], clone)
    assert "Data and pipelines are up to date" in _dvc(["status"], clone).stdout
    assert _assert_objects_verified(clone / ".dvc" / "cache") == total
    assert sorted(p.name for p in (clone / "data").iterdir()) == sorted(p.name for p in data.iterdir())


# ---- slow: the smoke study, 2 workers against serial -------------------------------------------------

ARMS = ("dpa", "vanilla")
FLOW_TIMEOUT = float(os.environ.get("DPA_TEST_FLOW_TIMEOUT", "1500"))


def _workers(repo: Path, *args: str, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = subprocess_env(repo, PREFECT_HOME=str(repo.parent / "prefect-home"),
                         PREFECT_SERVER_ANALYTICS_ENABLED="false", **(env_extra or {}))
    for k in [k for k in env if k.startswith("PREFECT_") and k not in ("PREFECT_HOME",
                                                                          "PREFECT_SERVER_ANALYTICS_ENABLED")]:
        del env[k]
    return start([sys.executable, "-m", "pipelines.workers", *args], log, cwd=repo, env=env)


def _wait(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=FLOW_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"dpa workers did not finish in {FLOW_TIMEOUT}s\n{tail(log, 80)}")


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    """The smoke study with 2 workers, each stage pushed to the default (local-directory) remote."""
    repo = make_repo_copy(tmp_path_factory.mktemp("parallel"), profile="smoke")
    log = repo.parent / "workers.log"
    t0 = time.monotonic()
    rc = _wait(_workers(repo, "--workers", "2", "--push", "stage", log=log), log)
    assert rc == 0, tail(log, 80)
    return repo, time.monotonic() - t0, log


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The same study with a plain serial `dvc repro` in another copy (its own cache)."""
    repo = make_repo_copy(tmp_path_factory.mktemp("serial"), profile="smoke")
    t0 = time.monotonic()
    _dvc(["repro"], repo, subprocess_env(repo))
    return repo, time.monotonic() - t0


def _objects(cache: Path) -> list[Path]:
    return [p for p in (cache / "files" / "md5").rglob("*") if p.is_file()]


def _assert_objects_verified(store: Path) -> int:
    """Every object under its content id hashes to that id (no partial object under a final name)."""
    objs = [p for p in _objects(store) if not p.name.endswith(".tmp") and ".tmp" not in p.name]
    assert objs, f"no objects in {store}"
    for p in objs:
        want = p.parent.name + p.name.removesuffix(".dir")
        assert hashlib.md5(p.read_bytes()).hexdigest() == want, f"{p} does not hash to its name"
    return len(objs)


@pytest.mark.slow
def test_two_workers_run_the_arms_side_by_side(parallel, serial):
    from mlflow.tracking import MlflowClient

    repo, seconds, log = parallel
    print(f"\nsmoke study, 2 arms: 2 workers {seconds:.0f} s, serial dvc repro {serial[1]:.0f} s "
          "(upper bounds: a loaded 2-core machine)")
    text = log.read_text()
    assert "with 2 at once" in text and "unit dpa-0" in text and "unit vanilla-0" in text
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dpa-study")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get("dpa.parent") == "true"}

    def span(arm, stage):
        (r,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[f"{arm}-seed0"]
                and r.info.run_name == stage]
        assert r.info.status == "FINISHED"
        return r.info.start_time, r.info.end_time

    for stage in ("align", "finetune"):
        (s1, e1), (s2, e2) = span("dpa", stage), span("vanilla", stage)
        assert max(s1, s2) < min(e1, e2), f"{stage}: dpa [{s1}, {e1}] and vanilla [{s2}, {e2}] do not overlap"


def _scores(path: Path) -> dict:
    """The scores, without the stopwatch readings (meta/<benchmark>/seconds, lik_seconds)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith("seconds")}


@pytest.mark.slow
def test_two_workers_give_the_serial_results_tensor_equal(parallel, serial):
    import torch
    from safetensors.torch import load_file

    a, b = parallel[0] / "outputs", serial[0] / "outputs"
    for arm in ARMS:
        ca, cb = (load_file(o / f"align/{arm}-seed0/connector.safetensors") for o in (a, b))
        assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca), f"{arm} connector differs"
        adapters = sorted((a / f"finetune/{arm}-seed0").rglob("*.safetensors"))
        assert adapters
        for f in adapters:
            ta, tb = load_file(f), load_file(b / f.relative_to(a))
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{f.relative_to(a)} differs"
        for rel in (f"eval/{arm}-seed0/scores.json", f"metrics/evaluate-{arm}-seed0.json"):
            sa, sb = (_scores(o / rel) for o in (a, b))
            assert sa == sb and len(sa) > 5, rel
    assert (a / "compare/comparison.md").read_text() == (b / "compare/comparison.md").read_text()


@pytest.mark.slow
def test_after_the_fold_back_the_checkout_is_as_after_a_serial_repro(parallel):
    repo, _, log = parallel
    assert "is cached - skipping run" in log.read_text()  # the fold-back restored the units from the run-cache
    assert "Data and pipelines are up to date" in _dvc(["status"], repo, subprocess_env(repo)).stdout
    assert _run(["git", "worktree", "list"], repo).stdout.count("\n") == 1  # every unit's workspace removed
    assert not (repo / ".dvc/tmp/workers").exists() or not any((repo / ".dvc/tmp/workers").iterdir())


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_finished_study(parallel, tmp_path):
    repo, _, _ = parallel
    env = subprocess_env(repo)
    remote = repo.parent / "dpa-dvc-remote"
    assert _dvc(["status", "--cloud"], repo, env).stdout.strip().endswith("are in sync.")
    _assert_objects_verified(remote)
    # the owner commits the study: dvc.lock and the uncached metrics/plots (docs/scaleout.md)
    _run([*GIT, "add", "dvc.lock"], repo)
    _run([*GIT, "add", "-f", "outputs/metrics", "outputs/plots"], repo)
    _run([*GIT, "commit", "-qm", "study results"], repo)
    clone = repo.parent / "clone"  # a sibling: the shipped relative remote url resolves to the same folder
    _run(["git", "clone", "-q", str(repo), str(clone)], repo.parent)
    cenv = subprocess_env(clone)
    assert not (clone / "outputs/merged").exists() and not (clone / "data").exists()
    _dvc(["pull"], clone, cenv)
    assert "Data and pipelines are up to date" in _dvc(["status"], clone, cenv).stdout
    show = [_run([sys.executable, "-m", "pipelines.cli", "show"], r, subprocess_env(r)).stdout for r in (repo, clone)]
    table = [s.split("\nMLflow")[0].strip() for s in show]  # the clone has no MLflow store to link to
    assert "dpa − vanilla" in table[0] and table[0] == table[1]
    assert not (clone / "mlflow.db").exists()  # nothing trained or logged in the clone


def _stage_pids(ws: Path, *words: str) -> list[int]:
    """Processes running in the workspace `ws` whose command line has every word (our own only)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd, cwd = " ".join(p.info["cmdline"] or []), p.cwd()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cwd.startswith(str(ws)) and all(w in cmd for w in words):
            out.append(p.info["pid"])
    return out


@pytest.mark.slow
def test_a_worker_killed_mid_stage_leaves_cache_and_remote_consistent(parallel):
    """Last (it changes the copy): a new finetune rate reruns every arm's chain from finetune on; the
    vanilla worker is killed (SIGKILL, its whole process group) while its finetune trains."""
    repo, _, _ = parallel
    log = repo.parent / "kill.log"
    ws = repo / ".dvc/tmp/workers/vanilla-0"
    proc = _workers(repo, "--workers", "2", "--push", "stage", "-S", "finetune.train.learning_rate=0.0004", log=log)
    deadline = time.monotonic() + FLOW_TIMEOUT
    victim = []
    while not victim and time.monotonic() < deadline and proc.poll() is None:
        victim = _stage_pids(ws, "dpa", "stage", "finetune", "--arm vanilla")
        time.sleep(0.5)
    assert victim, f"the vanilla finetune never started\n{tail(log, 60)}"
    # mid-stage: wait for its first training step, then kill the runner (dvc + the stage command:
    # the unit's process group) with SIGKILL, as a lost machine would
    started = time.monotonic()
    while not re.search(r"finetune/vanilla-seed0: +[1-9]", log.read_text()) and time.monotonic() - started < 120:
        time.sleep(0.5)
    os.killpg(os.getpgid(victim[0]), signal.SIGKILL)
    rc = _wait(proc, log)
    text = log.read_text()
    assert rc == 1, tail(log, 60)
    assert "1 of 5 units failed (vanilla-0)" in text  # of dpa-0, vanilla-0, no_align-0, diagnose-0, evaluate_reference
    assert "unit dpa-0' - Finished in state Completed" in text  # the other chain finished
    assert ws.exists()  # kept, to resume
    _assert_objects_verified(repo / ".dvc/cache")
    _assert_objects_verified(repo.parent / "dpa-dvc-remote")

    log2 = repo.parent / "rerun.log"
    assert _wait(_workers(repo, "--workers", "2", "--push", "stage", log=log2), log2) == 0, tail(log2, 80)
    rerun = log2.read_text()
    assert "Running stage 'finetune@vanilla-0'" in rerun and "Running stage 'finetune_proxy@dpa-0'" not in rerun
    env = subprocess_env(repo)
    assert "Data and pipelines are up to date" in _dvc(["status"], repo, env).stdout
    assert _dvc(["status", "--cloud"], repo, env).stdout.strip().endswith("are in sync.")
    _assert_objects_verified(repo.parent / "dpa-dvc-remote")
    # a fresh pull of everything from the remote verifies too
    cache2 = repo.parent / "cache2"
    _dvc(["config", "--local", "cache.dir", str(cache2)], repo, env)
    try:
        _dvc(["fetch"], repo, env)
        assert _assert_objects_verified(cache2) > 10
    finally:
        _dvc(["config", "--local", "--unset", "cache.dir"], repo, env)
        shutil.rmtree(cache2, ignore_errors=True)
