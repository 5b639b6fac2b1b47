"""pipelines/container.py: exact docker run / accelerate launch argv."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.container import (
    DEFAULT_PASSTHROUGH_ENV,
    accelerate_command,
    container_command,
    current_user,
    gpus_flag_value,
    passthrough_env,
)

REPO = Path("/home/alice/dpa")


def test_cpu_stage_exact_argv():
    cmd = container_command(
        ["mix"],
        image="dpa:cpu",
        workdir=REPO,
        gpus=None,
        env={},
        extra_mounts=[],
        user="1000:1000",
    )
    assert cmd == [
        "docker", "run", "--rm", "--init",
        "--user", "1000:1000",
        "-v", "/home/alice/dpa:/workspace",
        "-v", "/home/alice/dpa:/home/alice/dpa",
        "-w", "/home/alice/dpa",
        "--shm-size", "8g",
        "dpa:cpu",
        "mix",
    ]  # fmt: skip


def test_gpu_stage_with_env_and_mounts_exact_argv():
    cmd = container_command(
        ["dpa", "stage", "align", "--arm", "dpa", "--params", "params.yaml"],
        image="dpa:gpu",
        workdir="/home/alice/dpa",
        gpus="all",
        env={"MLFLOW_TRACKING_URI": None, "HF_HUB_OFFLINE": "1"},
        extra_mounts=["/scratch/hf:/home/dpa/.cache/huggingface", ("/datasets", "/datasets", "ro")],
        user="1234:5678",
    )
    assert cmd == [
        "docker", "run", "--rm", "--init",
        "--user", "1234:5678",
        "-v", "/home/alice/dpa:/workspace",
        "-v", "/home/alice/dpa:/home/alice/dpa",
        "-w", "/home/alice/dpa",
        "--shm-size", "8g",
        "--gpus", "all",
        "-e", "MLFLOW_TRACKING_URI",
        "-e", "HF_HUB_OFFLINE=1",
        "-v", "/scratch/hf:/home/dpa/.cache/huggingface",
        "-v", "/datasets:/datasets:ro",
        "dpa:gpu",
        "align", "--arm", "dpa", "--params", "params.yaml",
    ]  # fmt: skip


def test_without_host_path_mirror_workdir_is_workspace():
    cmd = container_command(
        ["merge"], "dpa:gpu", REPO, None, {}, [], user="1:2", mirror_host_path=False, shm_size=None
    )
    assert cmd == [
        "docker", "run", "--rm", "--init", "--user", "1:2",
        "-v", "/home/alice/dpa:/workspace", "-w", "/workspace",
        "dpa:gpu", "merge",
    ]  # fmt: skip


def test_repo_already_at_workspace_is_mounted_once():
    cmd = container_command(["merge"], "dpa:gpu", "/workspace", None, {}, [], user="1:2", shm_size=None)
    assert cmd == [
        "docker", "run", "--rm", "--init", "--user", "1:2",
        "-v", "/workspace:/workspace", "-w", "/workspace",
        "dpa:gpu", "merge",
    ]  # fmt: skip


def test_network_and_entrypoint_for_accelerate_in_container():
    launch = accelerate_command(
        ["dpa", "stage", "finetune", "--arm", "dpa"],
        "configs/accelerate/ddp.yaml",
        num_processes=8,
        no_python=True,
    )
    cmd = container_command(
        launch[1:],
        image="dpa:gpu",
        workdir=REPO,
        gpus="all",
        env={},
        extra_mounts=[],
        user="1000:1000",
        network="host",
        shm_size="32g",
        entrypoint=launch[0],
    )
    assert cmd == [
        "docker", "run", "--rm", "--init", "--user", "1000:1000",
        "-v", "/home/alice/dpa:/workspace",
        "-v", "/home/alice/dpa:/home/alice/dpa",
        "-w", "/home/alice/dpa",
        "--shm-size", "32g",
        "--network", "host",
        "--gpus", "all",
        "--entrypoint", "accelerate",
        "dpa:gpu",
        "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "8",
        "--no_python", "dpa", "stage", "finetune", "--arm", "dpa",
    ]  # fmt: skip


def test_default_user_is_invoking_user():
    cmd = container_command(["merge"], "dpa:cpu", REPO, None, {}, [])
    assert cmd[cmd.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}" == current_user()


@pytest.mark.parametrize(
    ("gpus", "value"),
    [
        ("all", "all"),
        ("2", "2"),
        ("0,1", '"device=0,1"'),
        ("device=0,1", '"device=0,1"'),
        ("device=3", '"device=3"'),
        ("GPU-3a2b", '"device=GPU-3a2b"'),
        ('"device=0,1"', '"device=0,1"'),
        ("driver=nvidia,count=2", "driver=nvidia,count=2"),
    ],
)
def test_gpus_flag_value(gpus, value):
    assert gpus_flag_value(gpus) == value


@pytest.mark.parametrize("gpus", ["", "0"])
def test_gpus_flag_value_rejects_ambiguous(gpus):
    with pytest.raises(ValueError):
        gpus_flag_value(gpus)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workdir": "relative/repo"},
        {"workdir": "/with:colon"},
        {"stage_argv": []},
        {"stage_argv": ["dpa", "stage"]},
        {"env": {"BAD-NAME": "x"}},
        {"extra_mounts": ["/only-source"]},
        {"extra_mounts": [("/a:b", "/c")]},
        {"image": ""},
    ],
)
def test_container_command_rejects_bad_input(kwargs):
    args = {"stage_argv": ["merge"], "image": "dpa:cpu", "workdir": REPO, "gpus": None, "env": {},
            "extra_mounts": [], "user": "1:1"}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError):
        container_command(**args)


def test_passthrough_env_only_names_set_on_host():
    environ = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "PREFECT_API_URL": "http://x", "HOME": "/root"}
    assert passthrough_env(environ) == {"MLFLOW_TRACKING_URI": None, "PREFECT_API_URL": None}
    assert passthrough_env(environ, ["HOME", "NOPE"]) == {"HOME": None}
    assert "MLFLOW_TRACKING_URI" in DEFAULT_PASSTHROUGH_ENV
    # values never reach the argv: only the names
    cmd = container_command(["merge"], "dpa:cpu", REPO, None, passthrough_env(environ), [], user="1:1")
    assert "sqlite:///mlflow.db" not in " ".join(cmd)
    assert cmd[cmd.index("-e") + 1] == "MLFLOW_TRACKING_URI"


def test_accelerate_command_minimal():
    assert accelerate_command(["train.py", "--lr", "1e-4"], "configs/accelerate/fsdp.yaml") == [
        "accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml",
        "train.py", "--lr", "1e-4",
    ]  # fmt: skip


def test_accelerate_command_multinode():
    cmd = accelerate_command(
        ["dpa", "stage", "finetune", "--arm", "dpa"],
        Path("configs/accelerate/multinode_ddp.yaml"),
        num_processes=16,
        num_machines=2,
        main_process_ip="10.0.0.1",
        main_process_port=29500,
        machine_rank=1,
        mixed_precision="bf16",
        no_python=True,
    )
    assert cmd == [
        "accelerate", "launch", "--config_file", "configs/accelerate/multinode_ddp.yaml",
        "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29500",
        "--mixed_precision", "bf16", "--no_python",
        "dpa", "stage", "finetune", "--arm", "dpa",
    ]  # fmt: skip


def test_accelerate_command_module_and_extra_args():
    cmd = accelerate_command(
        ["pipelines.cli", "stage", "align"],
        "c.yaml",
        num_processes=2,
        module=True,
        extra_launch_args=["--max_restarts", "0"],
        executable="/opt/venv/bin/accelerate",
    )
    assert cmd == [
        "/opt/venv/bin/accelerate", "launch", "--config_file", "c.yaml", "--num_processes", "2",
        "--max_restarts", "0", "--module", "pipelines.cli", "stage", "align",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {"script_argv": []},
        {"module": True, "no_python": True},
        {"num_processes": 0},
        {"num_machines": 0},
        {"num_machines": 2, "machine_rank": 2},
        {"machine_rank": -1},
        {"num_processes": 3, "num_machines": 2},
    ],
)
def test_accelerate_command_rejects_bad_input(kwargs):
    args = {"script_argv": ["train.py"], "config_file": "c.yaml"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        accelerate_command(**args)


def test_accelerate_cli_parses_built_argv():
    """accelerate's own parser accepts every flag accelerate_command emits."""
    from accelerate.commands.launch import launch_command_parser

    cmd = accelerate_command(
        ["dpa", "stage", "finetune"],
        "configs/accelerate/multinode_ddp.yaml",
        num_processes=16,
        num_machines=2,
        main_process_ip="10.0.0.1",
        main_process_port=29500,
        machine_rank=1,
        mixed_precision="bf16",
        no_python=True,
    )
    args = launch_command_parser().parse_args(cmd[2:])
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert (args.main_process_ip, args.main_process_port, args.mixed_precision) == ("10.0.0.1", 29500, "bf16")
    assert args.no_python and args.training_script == "dpa"
    assert args.training_script_args == ["stage", "finetune"]


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_cli_parses_built_argv(tmp_path):
    """The docker client accepts every flag (it fails only at the missing daemon)."""
    cmd = container_command(
        ["align", "--arm", "dpa"],
        "dpa:gpu",
        REPO,
        "0,1",
        {"MLFLOW_TRACKING_URI": None, "X": "1"},
        [("/a", "/b", "ro")],
        user="1000:1000",
        network="host",
        entrypoint="accelerate",
    )
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-daemon.sock")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown flag" not in proc.stderr and "invalid argument" not in proc.stderr, proc.stderr
    assert "daemon" in proc.stderr.lower(), proc.stderr
