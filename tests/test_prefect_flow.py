"""The Prefect flow's parts without a Prefect server: parameters -> params.yaml, the stage graph
from DVC, and the task body that runs one DVC stage."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from tests.e2e_helpers import isolate_prefect_home, make_repo_copy, subprocess_env, venv_bin

isolate_prefect_home()  # before prefect is imported: never touch ~/.prefect

from pipelines import prefect_flow as pf  # noqa: E402
from pipelines.params import ParamsError  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo_copy(tmp_path_factory.mktemp("prefect-unit"))


def _dvc_stage_list(repo) -> list[str]:
    return subprocess.run([str(venv_bin() / "dvc"), "stage", "list", "--name-only"], cwd=repo, check=True,
                          capture_output=True, text=True, env=subprocess_env()).stdout.split()


@pytest.mark.parametrize("proxy_arms,plain_arms,seeds", [
    (None, None, None),                                  # params.yaml as it is: dpa, vanilla, seed 0
    (["dpa", "pmo_only"], ["vanilla", "cal"], [0, 1]),   # the ablations, two seeds
    ([], ["vanilla"], [3]),                              # no proxy arm
])
def test_stage_graph_matches_dvc_stage_list(repo, proxy_arms, plain_arms, seeds):
    p = pf.apply_params(repo, pf.build_overrides("smoke", proxy_arms, plain_arms, seeds))
    graph = pf.stage_graph(repo)
    assert list(graph) and set(graph) == set(_dvc_stage_list(repo)) == set(pf.expected_stages(p))
    done: set[str] = set()
    for stage, deps in graph.items():  # topological: every dependency comes first
        assert set(deps) <= done, (stage, deps)
        done.add(stage)
    entries = pf.stage_entries(repo)  # the registry stage each DVC stage runs (`dpa stage NAME`)
    assert set(entries) == set(graph) and set(entries.values()) == set(pf.STAGES)
    assert all(entries[s] == s.split("@")[0].removesuffix("_proxy") for s in entries)  # dvc.yaml's naming
    assert set(graph["compare"]) >= {s for s in graph if entries[s] == "evaluate"}
    for seed in p.study.seeds:
        for arm in p.study.plain_arms:  # arms without a proxy never wait for the proxy stage
            assert f"proxy@{seed}" not in graph[f"align@{arm}-{seed}"]
        for arm in p.study.proxy_arms:
            assert f"proxy@{seed}" in graph[f"align_proxy@{arm}-{seed}"]


def test_overrides_are_written_like_dvc_exp_run_set(tmp_path):
    """params.yaml after the flow's overrides is byte for byte what `dvc exp run -S` writes (DVC's
    own Hydra composition of conf/), and the overrides win over the profile."""
    from dvc.utils.hydra import compose_and_dump

    repo = make_repo_copy(tmp_path)  # params.yaml as committed: profile toy, vanilla, seed 0
    committed = (repo / "params.yaml").read_text()
    pf.apply_params(repo, pf.build_overrides("smoke", None, ["vanilla", "cal"], [0, 1],
                                             {"proxy.lora.r": 64, "evaluate": {"max_new_tokens": "12"},
                                              "world.size": "default"}))
    compose_and_dump(tmp_path / "dvc.yaml", str(repo / "conf"), None, "config", "",
                     ["profile=smoke", "study.plain_arms=[vanilla,cal]", "study.seeds=[0,1]", "proxy.lora.r=64",
                      "evaluate.max_new_tokens=12", "world.size=default"])
    assert (repo / "params.yaml").read_text() == (tmp_path / "dvc.yaml").read_text()
    p = pf.validate(repo, {})  # what `dpa stage` reads
    assert (p.profile, p.proxy.lora.r, p.evaluate.max_new_tokens, p.world.size) == ("smoke", 64, 12, "default")
    assert p.align.train.max_steps == 4  # the rest of the profile
    pf.apply_params(repo, pf.build_overrides("toy"))
    assert (repo / "params.yaml").read_text() == committed  # and back, byte for byte


@pytest.mark.parametrize("kwargs,message", [
    ({"overrides": {"proxy.lora.rr": 64}}, "unknown key 'proxy.lora.rr'. Did you mean 'r'?"),
    ({"overrides": {"finetun.tune": "full"}}, "unknown key 'finetun'. Did you mean 'finetune'?"),
    ({"plain_arms": ["vanila"]}, "unknown arm 'vanila'. Did you mean 'vanilla'?"),
    ({"profile": "smok"}, "unknown profile 'smok'. Did you mean 'smoke'?"),
    ({"seeds": []}, "study.seeds is empty"),
    ({"overrides": {"loss.window": 2}}, "loss.window must be an odd number"),
])
def test_invalid_settings_fail_before_anything_is_written(repo, kwargs, message):
    before = (repo / "params.yaml").read_text()
    with pytest.raises(ParamsError) as e:
        pf.apply_params(repo, pf.build_overrides(**{"profile": "smoke", **kwargs}))
    assert message in str(e.value)
    assert (repo / "params.yaml").read_text() == before
    assert not list(repo.glob(".params.*"))  # no temporary file left behind


def test_retries_for_training_and_evaluation_only():
    for stage, entry in (("proxy@0", "proxy"), ("align_proxy@dpa-0", "align"), ("finetune@vanilla-0", "finetune"),
                         ("evaluate_proxy@dpa-0", "evaluate"), ("evaluate_reference", "evaluate_reference")):
        t = pf.stage_task(stage, entry)
        assert t.retries == pf.RETRIES > 0 and t.task_run_name == stage and t.name == entry
    for stage, entry in (("world", "world"), ("mix", "mix"), ("diagnose@0", "diagnose"), ("merge@vanilla-0", "merge"),
                         ("compare", "compare")):
        assert pf.stage_task(stage, entry).retries == 0
    assert pf.validate_params.retries == 0
    bad_input = pf.StageFailed("align@cal-0", 255, "[dpa] error: x", input_error=True)

    class S:
        data = bad_input

    assert pf._retry_unless_input_error(None, None, S) is False
    S.data = pf.StageFailed("align@cal-0", 255, "CUDA out of memory")
    assert pf._retry_unless_input_error(None, None, S) is True


@pytest.fixture()
def toy_dvc(tmp_path):
    """A two-stage DVC project: `ok` writes a file, `bad` fails (as a `dpa` input error when asked)."""
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          ok:
            cmd: >-
              python -c "print('line one'); print('line two'); open('out.txt', 'w').write('x')"
            outs: [out.txt]
          bad:
            cmd: >-
              python -c "import sys; print('[dpa] error: data.json: data file not found.'); sys.exit(2)"
            deps: [out.txt]
        """))
    env = subprocess_env()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(venv_bin() / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=env)
    return tmp_path


class ListLogger:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, fmt, *args):
        self.lines.append(fmt % args)


def test_run_dvc_stage_streams_output_skips_cached_and_raises_with_the_tail(toy_dvc, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    log = ListLogger()
    res = pf.run_dvc_stage("ok", str(toy_dvc), log, flow_run_id="run-123")
    assert res == {"stage": "ok", "skipped": False}
    assert "line one" in log.lines and "line two" in log.lines  # streamed line by line
    assert (toy_dvc / "out.txt").exists() and "ok:" in (toy_dvc / "dvc.lock").read_text()

    log2 = ListLogger()
    assert pf.run_dvc_stage("ok", str(toy_dvc), log2)["skipped"] is True  # DVC's cache: nothing reran
    assert any("Stage 'ok' didn't change, skipping" in l for l in log2.lines)

    with pytest.raises(pf.StageFailed) as e:
        pf.run_dvc_stage("bad", str(toy_dvc), ListLogger())
    assert e.value.input_error and "data file not found" in str(e.value) and "'bad'" in str(e.value)


def test_stage_env_puts_this_python_first_and_tags_the_flow_run():
    env = pf.stage_env("abc")
    assert env["DPA_PREFECT_FLOW_RUN_ID"] == "abc"
    import sys
    from pathlib import Path

    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_cli_parses_like_dpa_flow():
    from pipelines.cli import flow_parser

    a = flow_parser().parse_args(["--profile", "smoke", "--plain-arms", "vanilla, cal", "--seeds", "0,1", "-S",
                                 "proxy.lora.r=64"])
    assert (a.action, a.profile, a.plain_arms, a.seeds, a.set) == ("run", "smoke", ["vanilla", "cal"], [0, 1],
                                                                   ["proxy.lora.r=64"])
    assert flow_parser().parse_args(["serve"]).action == "serve"


@pytest.fixture()
def slow_dvc(tmp_path, monkeypatch):
    """A DVC project whose one stage `slow` prints 'started' and sleeps; yields (dir, marker)."""
    import time

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    marker = f"dpa-sleeper-{time.time_ns()}"
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          slow:
            cmd: >-
              python -c "print('started', flush=True); import time; time.sleep(120)" {marker}
        """))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(venv_bin() / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=subprocess_env())
    yield tmp_path, marker
    for p in _procs_with(marker):  # never leave one behind, even when the test fails
        p.kill()


def _procs_with(marker: str) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]


def _wait_gone(marker: str, timeout: float) -> list:
    import time

    deadline = time.monotonic() + timeout
    while (left := _procs_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_an_interrupted_stage_leaves_no_process_behind(slow_dvc):
    """A cancelled task (any exception while streaming) stops dvc and the stage command it started."""
    import time

    project, marker = slow_dvc

    class Cancel(Exception):
        pass

    class CancellingLogger(ListLogger):
        def info(self, fmt, *args):
            super().info(fmt, *args)
            if "started" in self.lines[-1]:
                raise Cancel()

    t0 = time.monotonic()
    with pytest.raises(Cancel):
        pf.run_dvc_stage("slow", str(project), CancellingLogger())
    assert time.monotonic() - t0 < 60
    assert not _wait_gone(marker, 5)


def test_a_killed_flow_run_process_leaves_no_stage_behind(slow_dvc, tmp_path_factory):
    """Prefect cancels a flow run by killing its process: the stage command must not outlive it."""
    import os
    import signal
    import sys
    import time

    project, marker = slow_dvc
    code = ("import sys; from pipelines.prefect_flow import run_dvc_stage; "
            f"run_dvc_stage('slow', {str(project)!r})")
    env = subprocess_env(PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")))
    flow_proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _procs_with(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _procs_with(marker), "the stage did not start"
        os.kill(flow_proc.pid, signal.SIGKILL)
        flow_proc.wait()
        assert not _wait_gone(marker, 30)
    finally:
        if flow_proc.poll() is None:
            flow_proc.kill()
