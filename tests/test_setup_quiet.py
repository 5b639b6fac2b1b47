"""scripts/setup.sh installs VLMEvalKit without its dependency list and must not make pip print
"ERROR: pip's dependency resolver ..." for the requirements left out on purpose. Checked with real
pip on two local stand-in packages (offline): VLMEvalKit's order in setup.sh is quiet, the other
order is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_helpers import REPO

RESOLVER_ERROR = "ERROR: pip's dependency resolver"


def _pip(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _package(root: Path, name: str, deps: list[str]) -> Path:
    d = root / name
    (d / name.replace("-", "_")).mkdir(parents=True)
    (d / name.replace("-", "_") / "__init__.py").write_text("")
    (d / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "1.0"\ndependencies = {deps!r}\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'.replace("'", '"'))
    return d


def test_setup_installs_the_needed_dependencies_before_vlmevalkit():
    lines = (REPO / "scripts/setup.sh").read_text().splitlines()
    needed = next(i for i, line in enumerate(lines) if "-r requirements/vlmeval.txt" in line)
    vlmeval = next(i for i, line in enumerate(lines) if "--no-deps nvidia-vlmeval" in line)
    assert needed < vlmeval


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("pkgs")
    # stand-ins: "vlmeval" needs "needed" (installed) and "left-out" (deliberately not installed)
    vlm = _package(root, "fake-vlmeval", ["fake-needed", "fake-left-out"])
    need = _package(root, "fake-needed", [])
    res = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "wh"), str(vlm), str(need))
    assert res.returncode == 0, res.stderr
    return {p.name.split("-")[0]: p for p in (root / "wh").glob("*.whl")}


def _install(venv: Path, *args) -> str:
    res = _pip("--python", str(venv / "bin" / "python"), "install", "-q", "--no-index", *map(str, args))
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


@pytest.mark.parametrize("order", ["setup.sh", "reversed"])
def test_pip_reports_left_out_requirements_only_in_the_other_order(order, wheels, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    needed, vlmeval = wheels["fake_needed"], wheels["fake_vlmeval"]
    if order == "setup.sh":
        out = _install(venv, needed) + _install(venv, "--no-deps", vlmeval)
        assert RESOLVER_ERROR not in out
    else:
        out = _install(venv, "--no-deps", vlmeval) + _install(venv, needed)
        assert RESOLVER_ERROR in out and "fake-left-out" in out
