"""Command lines for running pipeline stages in a container and under ``accelerate launch``.

Pure string building: nothing here runs a process, reads a file or touches the environment
at import time. The images (docker/Dockerfile.{cpu,gpu}) have ``ENTRYPOINT ["dpa", "stage"]``,
so a container runs exactly one named stage::

    container_command(["align", "--arm", "dpa"], image="dpa:gpu", workdir=repo_root,
                      gpus="all", env=passthrough_env(os.environ), extra_mounts=[])
    # docker run --rm --init --user 1000:1000 -v /repo:/workspace -v /repo:/repo -w /repo
    #   --shm-size 8g --gpus all -e MLFLOW_TRACKING_URI dpa:gpu align --arm dpa

The repo is bind-mounted at /workspace (the image's editable install points there, so the
mounted code runs) and, by default, also at its own host path, which is the container's
working directory: MLflow stores absolute artifact locations, so runs logged inside and
outside containers then resolve to the same files. One DVC cache, one MLflow store.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

WORKSPACE = "/workspace"
"""Where the images expect the repo (their WORKDIR and editable install)."""

ENTRYPOINT = ("dpa", "stage")
"""The images' ENTRYPOINT: the container argv is a stage name and its options."""

DEFAULT_PASSTHROUGH_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
    "TORCH_DISTRIBUTED_DEBUG",
)
"""Variables handed to the container by name (``-e NAME``) when set on the host.
Passing by name keeps values (tokens, passwords) off the command line."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Mount = str | Sequence[str | os.PathLike[str]]


def passthrough_env(
    environ: Mapping[str, str], names: Iterable[str] = DEFAULT_PASSTHROUGH_ENV
) -> dict[str, None]:
    """``{name: None}`` for each of ``names`` set in ``environ``: container_command passes
    those through by name, docker copying the values from its own environment."""
    return {name: None for name in names if name in environ}


def current_user() -> str:
    """``uid:gid`` of this process, the owner to give files the container writes."""
    return f"{os.getuid()}:{os.getgid()}"


def gpus_flag_value(gpus: str) -> str:
    """The value for ``docker run --gpus``.

    ``"all"`` and a count (``"2"``: any two GPUs) pass as they are. A device list (``"0,1"``,
    ``"device=0,1"``, ``"GPU-uuid"``) is written ``"device=0,1"`` *with* the double quotes:
    docker reads the flag as CSV, so an unquoted comma would split the device list.
    """
    value = gpus.strip()
    if not value:
        raise ValueError("gpus must be 'all', a count, or device ids")
    if value.isdigit() and int(value) == 0:
        raise ValueError("gpus='0' would request zero GPUs: use None for none, 'device=0' for GPU 0")
    if value == "all" or value.isdigit() or value.startswith('"'):
        return value
    if value.startswith("device="):
        value = value[len("device=") :]
    elif "=" in value:  # driver=..., capabilities=...: the caller's own CSV
        return value
    return f'"device={value}"'


def _mount_arg(mount: Mount) -> str:
    if isinstance(mount, str):
        spec = mount
    else:
        parts = [os.fspath(p) for p in mount]
        if len(parts) not in (2, 3):
            raise ValueError(f"a mount is (source, target) or (source, target, mode), got {mount!r}")
        for part in parts[:2]:
            if ":" in part:
                raise ValueError(f"':' in a mount path is not supported by docker -v: {part!r}")
        spec = ":".join(parts)
    if spec.count(":") not in (1, 2):
        raise ValueError(f"a mount is 'source:target[:mode]', got {spec!r}")
    return spec


def _env_args(env: Mapping[str, str | None]) -> list[str]:
    args: list[str] = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        args += ["-e", name if value is None else f"{name}={value}"]
    return args


def container_command(
    stage_argv: Sequence[str],
    image: str,
    workdir: Path | str,
    gpus: str | None = None,
    env: Mapping[str, str | None] | None = None,
    extra_mounts: Sequence[Mount] = (),
    *,
    user: str | None = None,
    mirror_host_path: bool = True,
    shm_size: str | None = "8g",
    network: str | None = None,
    entrypoint: str | None = None,
    docker: str = "docker",
) -> list[str]:
    """The ``docker run`` argv that runs one pipeline stage in ``image``.

    stage_argv: the stage and its options, e.g. ``["align", "--arm", "dpa", "--seed", "0"]``;
        a leading ``dpa stage`` is dropped (the image's ENTRYPOINT supplies it). With
        ``entrypoint`` set, stage_argv is passed verbatim to that program instead.
    workdir: absolute host path of the repo; mounted at /workspace (and at itself when
        ``mirror_host_path``, which is then the working directory).
    gpus: None for no GPUs, else ``"all"``, a count or device ids (see gpus_flag_value).
    env: ``{NAME: value}`` sets NAME in the container; ``{NAME: None}`` passes the host's
        value through by name (``-e NAME``), keeping it off the command line.
    extra_mounts: more bind mounts, ``"src:dst[:mode]"`` or ``(src, dst[, mode])``.
    user: ``uid:gid`` to run as; default: this process's, so files written to the
        mount belong to the invoking user.
    shm_size: size of /dev/shm (DataLoader workers and NCCL outgrow docker's 64 MB).
    network: e.g. ``"host"`` when MLFLOW_TRACKING_URI / PREFECT_API_URL point at
        localhost, or for multi-node NCCL.
    """
    host = PurePosixPath(os.fspath(workdir))
    if not host.is_absolute():
        raise ValueError(f"workdir must be an absolute path, got {os.fspath(workdir)!r}")
    if ":" in str(host):
        raise ValueError(f"':' in the repo path is not supported by docker -v: {host}")
    if not image:
        raise ValueError("image is required")
    argv = list(stage_argv)
    if entrypoint is None and tuple(argv[: len(ENTRYPOINT)]) == ENTRYPOINT:
        argv = argv[len(ENTRYPOINT) :]
    if entrypoint is None and not argv:
        raise ValueError("stage_argv must name a stage")

    cmd = [docker, "run", "--rm", "--init", "--user", user or current_user()]
    cmd += ["-v", f"{host}:{WORKSPACE}"]
    if mirror_host_path and str(host) != WORKSPACE:
        cmd += ["-v", f"{host}:{host}", "-w", str(host)]
    else:
        cmd += ["-w", WORKSPACE]
    if shm_size:
        cmd += ["--shm-size", shm_size]
    if network:
        cmd += ["--network", network]
    if gpus is not None:
        cmd += ["--gpus", gpus_flag_value(gpus)]
    cmd += _env_args(env or {})
    for mount in extra_mounts:
        cmd += ["-v", _mount_arg(mount)]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    return [*cmd, image, *argv]


def accelerate_command(
    script_argv: Sequence[str],
    config_file: Path | str,
    num_processes: int | None = None,
    num_machines: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    machine_rank: int | None = None,
    *,
    mixed_precision: str | None = None,
    module: bool = False,
    no_python: bool = False,
    extra_launch_args: Sequence[str] = (),
    executable: str = "accelerate",
) -> list[str]:
    """The ``accelerate launch`` argv running ``script_argv`` under ``config_file``.

    Options left None come from the config file (flags override the file).
    script_argv: a script and its args (``["train.py", "--x", "1"]``); with ``module`` a
        module name (``-m``); with ``no_python`` an executable, e.g.
        ``["dpa", "stage", "finetune", "--arm", "dpa"]`` runs a stage on every rank.
    num_processes: the TOTAL across machines (accelerate's meaning).
    """
    if not script_argv:
        raise ValueError("script_argv must name a script, module or executable")
    if module and no_python:
        raise ValueError("module and no_python are mutually exclusive")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_machines is not None and num_machines < 1:
        raise ValueError(f"num_machines must be >= 1, got {num_machines}")
    if machine_rank is not None:
        if machine_rank < 0 or (num_machines is not None and machine_rank >= num_machines):
            raise ValueError(f"machine_rank {machine_rank} is outside 0..num_machines-1")
    if num_processes is not None and num_machines is not None and num_processes % num_machines:
        raise ValueError(
            f"num_processes ({num_processes}) is the total over machines and must be a "
            f"multiple of num_machines ({num_machines})"
        )

    cmd = [executable, "launch", "--config_file", os.fspath(config_file)]
    for flag, value in (
        ("--num_processes", num_processes),
        ("--num_machines", num_machines),
        ("--machine_rank", machine_rank),
        ("--main_process_ip", main_process_ip),
        ("--main_process_port", main_process_port),
        ("--mixed_precision", mixed_precision),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += list(extra_launch_args)
    if module:
        cmd.append("--module")
    if no_python:
        cmd.append("--no_python")
    return [*cmd, *script_argv]
