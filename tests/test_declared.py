"""What DVC records is what runs (issue 12): the settings DVC tracks are the ones the stages use,
and every stage depends on all the code it imports.

- params.yaml is composed by DVC (Hydra) from conf/: under a profile, the stage deps are that
  profile's models and data, and `dvc params diff` shows the profile's values;
- each stage's code deps in dvc.yaml cover the transitive in-repo import closure of its entry
  point (`dpa stage NAME`): an edit anywhere in that closure makes DVC rerun the stage.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e_helpers import make_repo_copy, subprocess_env, venv_bin

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpa_core", "pipelines")


# ---- the import closure of a stage's entry point --------------------------------------------------

def _module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_name(f: Path) -> str:
    parts = list(f.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk(node):
    """ast.walk without `if TYPE_CHECKING:` blocks (never run)."""
    if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
        yield from (n for child in node.orelse for n in _walk(child))
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk(child)


def _imports(nodes, module: str, is_pkg: bool) -> set[str]:
    """In-repo modules imported anywhere in `nodes` (module level and inside functions)."""
    out: set[str] = set()
    package = module if is_pkg else module.rpartition(".")[0]
    for node in nodes:
        for n in _walk(node):
            if isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                    mod = ".".join(base + ([n.module] if n.module else []))
                else:
                    mod = n.module or ""
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in n.names)  # `from pkg import module`
    return {m for m in out if _module_file(m) is not None}


def _closure(modules: set[str], known: set[Path] = frozenset()) -> set[Path]:
    """Files of `modules`, their parent packages and everything they import, transitively (files in
    `known` are taken as already analysed)."""
    seen: set[Path] = set(known)
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            f = _module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.extend(_imports([ast.parse(f.read_text())], _module_name(f), f.name == "__init__.py"))
    return seen


def _function_imports(f: Path, entry: str) -> set[str]:
    """Modules imported by the module `f` at its top level and by the function `entry` and the
    module's own functions it calls (transitively)."""
    tree = ast.parse(f.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    top += [n for n in tree.body if isinstance(n, ast.ClassDef)]
    used, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in used or name not in funcs:
            continue
        used.add(name)
        todo.extend(n.id for n in ast.walk(funcs[name]) if isinstance(n, ast.Name) and n.id in funcs)
    return _imports(top + [funcs[u] for u in used], _module_name(f), f.name == "__init__.py")


def stage_code(stage: str) -> set[Path]:
    """Every in-repo file that `dpa stage STAGE` may import: pipelines/cli.py's run_stage, the stage
    function of the stage registry and what they import, transitively."""
    from pipelines.entrypoints import STAGES

    cli, registry = ROOT / "pipelines/cli.py", ROOT / "pipelines/entrypoints.py"
    fn = STAGES[stage].fn.__name__
    mods = _function_imports(cli, "run_stage") | _function_imports(registry, fn) | {"pipelines"}
    return _closure(mods, known={cli, registry})


def dvc_stages(repo: Path = ROOT) -> dict:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {s.name: (s.cmd, [d.def_path for d in s.deps]) for s in r.index.stages}


def _covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def test_every_stage_depends_on_the_code_it_imports():
    stages = dvc_stages()
    assert stages
    missing = {}
    for name, (cmd, deps) in stages.items():
        m = re.match(r"dpa stage (\w+)", cmd)
        assert m, f"{name}: {cmd!r} is not `dpa stage NAME`"
        lost = sorted(str(f.relative_to(ROOT)) for f in stage_code(m.group(1)) if not _covered(f, deps))
        if lost:
            missing[name] = lost
    assert not missing, "dvc.yaml deps miss code the stage imports:\n" + json.dumps(missing, indent=1)


def test_the_closure_check_can_fail():
    closure = stage_code("proxy")
    assert ROOT / "dpa_core/chunked_ce.py" in closure and ROOT / "dpa_core/losses.py" in closure
    assert not _covered(ROOT / "dpa_core/chunked_ce.py", ["dpa_core/stages.py", "dpa_core/trainer.py"])
    assert _covered(ROOT / "dpa_core/evaluation/tsv_benchmark.py", ["dpa_core/evaluation"])


# ---- one composed settings file that DVC reads ---------------------------------------------------

@pytest.fixture(scope="module")
def qwen_repo(tmp_path_factory):
    """A copy of the project (params.yaml committed as the toy profile composes it) whose params.yaml
    is then written as `dvc exp run -S profile=qwen2.5-7b` writes it (DVC's own Hydra composition)."""
    from dvc.utils.hydra import compose_and_dump

    repo = make_repo_copy(tmp_path_factory.mktemp("declared"))
    compose_and_dump(repo / "params.yaml", str(repo / "conf"), None, "config", "", ["profile=qwen2.5-7b"])
    return repo


def test_profile_switch_points_the_deps_at_the_profiles_models_and_data(qwen_repo):
    toy, qwen = dvc_stages(ROOT), dvc_stages(qwen_repo)
    for stage in ("proxy@0", "align_proxy@dpa-0", "align@vanilla-0", "finetune@vanilla-0", "merge@vanilla-0",
                  "evaluate_reference"):
        deps = qwen[stage][1]
        assert "models/Qwen2.5-7B-Instruct" in deps and "data/toyworld/models/llm" not in deps, (stage, deps)
        assert "data/toyworld/models/llm" in toy[stage][1]
    assert "models/clip-vit-large-patch14-336" in qwen["align@vanilla-0"][1]
    assert "data" in qwen["mix"][1] and "data" in qwen["evaluate@vanilla-0"][1]  # data.root, LMUData under it


def test_dvc_params_diff_shows_the_profiles_values(qwen_repo):
    res = subprocess.run([str(venv_bin() / "dvc"), "params", "diff", "--json"], cwd=qwen_repo,
                         env=subprocess_env(qwen_repo), capture_output=True, text=True, check=True)
    diff = json.loads(res.stdout)["params.yaml"]
    assert (diff["proxy.lora.r"]["old"], diff["proxy.lora.r"]["new"]) == (16, 256)
    assert (diff["profile"]["old"], diff["profile"]["new"]) == ("toy", "qwen2.5-7b")
    assert diff["model.llm"]["new"] == "models/Qwen2.5-7B-Instruct"
    assert diff["finetune.train.learning_rate"]["new"] == pytest.approx(4e-5)
    assert "proxy.train.learning_rate" not in diff  # the toy proxy already uses the paper's 4e-5


def test_stages_read_only_params_yaml(qwen_repo):
    """What `dpa stage` loads is params.yaml as DVC composed it: no second merge of a profile."""
    from pipelines.params import load_params

    p = load_params(qwen_repo / "params.yaml")
    assert (p.profile, p.proxy.lora.r, p.model.llm) == ("qwen2.5-7b", 256, Path("models/Qwen2.5-7B-Instruct"))
    text = (qwen_repo / "params.yaml").read_text().replace("    r: 256\n", "    r: 64\n", 1)
    (qwen_repo / "params.yaml").write_text(text)  # as `dvc exp run -S proxy.lora.r=64` would leave it
    try:
        assert load_params(qwen_repo / "params.yaml").proxy.lora.r == 64
    finally:
        (qwen_repo / "params.yaml").write_text(text.replace("    r: 64\n", "    r: 256\n", 1))
