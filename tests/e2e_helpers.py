"""Shared helpers for the end-to-end tests: a throwaway copy of the repository to run the pipeline
in, the environment for its subprocesses, and a real local Prefect server.

The pipeline never runs in the working tree itself: `make_repo_copy` copies the files git knows
about (tracked, plus untracked-but-not-ignored; never .venv, data/, outputs/ or DVC's cache) into
a fresh git repository, and every subprocess runs there with this project's .venv first on PATH.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def isolate_prefect_home() -> Path:
    """Point PREFECT_HOME at a fresh temporary directory (call before importing prefect): the
    user's ~/.prefect is never read or written by the tests."""
    import atexit
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="dpa-test-prefect-home-"))
    atexit.register(shutil.rmtree, home, True)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_PROFILES_PATH", None)
    return home


def venv_bin() -> Path:
    """The bin directory of the project's virtual environment (this interpreter's as a fallback)."""
    bindir = REPO / ".venv" / "bin"
    return bindir if (bindir / "python").exists() else Path(sys.executable).parent


# What a run of the pipeline leaves in a checkout that git does not ignore: `bash scripts/demo.sh`
# (the README's first command) writes dvc.lock. A copy never takes it, so the tests see a pipeline
# that has never run whatever the user did in the checkout before (issue 15: README order).
PIPELINE_STATE = ("dvc.lock",)


def make_repo_copy(tmp_path: Path, profile: str | None = None, source: Path | None = None) -> Path:
    """Copy the repository's working tree into `tmp_path / "repo"` and make it a git repository.

    Copies what `git ls-files -co --exclude-standard` lists in the source checkout (tracked files
    and untracked files that are not ignored, as they are on disk now), so ignored paths such as
    .venv/, data/, outputs/, mlflow.db and DVC's cache (.dvc/cache, .dvc/tmp) are left behind, and
    so is the pipeline state in PIPELINE_STATE (dvc.lock): the copy starts with an empty DVC cache,
    no pipeline outputs and no record of an earlier run, whatever ran in the checkout before. The copy is then committed
    (`git init && git add -A && git commit`) so DVC sees a clean git repository.

    Args:
        tmp_path: a directory for the copy (e.g. pytest's tmp_path); the copy is `tmp_path/"repo"`.
        profile: when given, the copy's default profile (the `- profile: NAME` line of
            conf/config.yaml's defaults list) is set to it (e.g. "smoke") and params.yaml is composed
            from conf/ by DVC's own Hydra composition, as `dvc exp run -S profile=NAME` writes it,
            before the commit.
        source: the checkout to copy (default: this repository).

    Returns:
        The path of the copy. Run commands in it with `env=subprocess_env(copy)` so that `dvc` and
        `dpa` come from this project's .venv and import the copy's own `pipelines`/`dpa_core`
        (PYTHONPATH=copy; the editable install would otherwise import the source checkout's).
    """
    source = Path(source or REPO)
    dest = Path(tmp_path) / "repo"
    dest.mkdir(parents=True, exist_ok=False)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=source, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if rel == ".venv" or rel.startswith(".venv/") or rel in PIPELINE_STATE:
            continue
        src = source / rel
        if not src.is_file():  # deleted since the index was read, or a directory entry
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
    if profile is not None:
        from dvc.utils.hydra import compose_and_dump

        config = dest / "conf" / "config.yaml"
        text, n = re.subn(r"(?m)^  - profile:[ \t]*\S+", f"  - profile: {profile}", config.read_text(), count=1)
        if n != 1:
            raise RuntimeError("conf/config.yaml has no `- profile:` default to set")
        config.write_text(text)
        compose_and_dump(dest / "params.yaml", str(dest / "conf"), None, "config", "", [])
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=dest, check=True)
    return dest


def subprocess_env(repo: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for pipeline subprocesses: .venv/bin first on PATH, offline Hugging Face, no DVC
    analytics; with `repo`, PYTHONPATH=repo so `dpa` imports the copy's code, not the editable
    install's (which points at the source checkout)."""
    env = dict(os.environ)
    # mlflow.set_tracking_uri() (called by in-process tests) exports MLFLOW_TRACKING_URI; a pipeline
    # started here must log to its own repository's store unless a test passes one explicitly.
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    if repo is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail early when `proc` exits (showing the end of `log`)."""
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}\n{tail(log)}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last})\n{tail(log)}")


def tail(path: Path | None, n: int = 60) -> str:
    if path is None or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Start a background process in its own process group, output to `log`."""
    f = open(log, "ab")
    try:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
    finally:
        f.close()


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started by `start` and everything it started (its group and descendants)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    deadline = time.monotonic() + timeout
    while _running(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in _running(family):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def _running(procs) -> list:
    """The processes still running; zombies (exited, waiting to be reaped) do not count."""
    import psutil

    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Settings for a throwaway Prefect: its own PREFECT_HOME (embedded SQLite there), no telemetry."""
    env = subprocess_env()
    for k in list(env):
        if k.startswith("PREFECT_"):
            del env[k]
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
               PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None, timeout: float = 180) -> Iterator[str]:
    """A real `prefect server start --host 127.0.0.1` (embedded SQLite in `home`); yields its URL
    (`http://127.0.0.1:PORT`; API under /api). Stopped, with all its processes, on exit."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    env = prefect_env(home, PREFECT_SERVER_UI_API_URL=f"{url}/api", PREFECT_UI_URL=url)
    proc = start([str(venv_bin() / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                  "--analytics-off", "--log-level", "WARNING"], log, env=env, cwd=home)
    try:
        wait_http(f"{url}/api/health", timeout, proc, log)
        yield url
    finally:
        stop(proc)


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None
