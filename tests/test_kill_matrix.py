"""Issue 15, item 7: SIGKILL anywhere in a training stage, then `dvc repro`: the outputs equal an
uninterrupted run's, and a settings change between the kill and the rerun never resumes a stale
checkpoint. Smoke profile, real DVC, in a repository copy.

Each training stage (proxy, align, finetune of the dpa arm) is killed once, at one of three kinds
of point, the kinds shuffled over the stages by a seeded draw (DPA_KILL_SEED, printed):
  step        a random moment (0-0.2 s, about two smoke steps) after the first complete checkpoint
  checkpoint  while a checkpoint is being written (a checkpoint-N without its completion marker)
  output      while the final output is being written (its `.NAME.tmp-*` sibling exists)
The kill takes the whole process group (dvc and the stage under it), as a kill -9 of a terminal.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e_helpers import make_repo_copy, subprocess_env, venv_bin

pytestmark = pytest.mark.slow

STAGES = {  # DVC stage -> (output dir, weights file in it)
    "proxy@0": ("outputs/proxy/seed0", "adapter_model.safetensors"),
    "align_proxy@dpa-0": ("outputs/align/dpa-seed0", "connector.safetensors"),
    "finetune_proxy@dpa-0": ("outputs/finetune/dpa-seed0", "adapter/adapter_model.safetensors"),
}
KINDS = ("step", "checkpoint", "output")


def _dvc(repo: Path, *args: str, log: Path) -> str:
    proc = subprocess.run([str(venv_bin() / "dvc"), *args], cwd=repo, env=subprocess_env(repo), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    with open(log, "a") as f:
        f.write(f"$ dvc {' '.join(args)}\n{proc.stdout}\n")
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def _reached(repo: Path, out: str, kind: str, rng: random.Random, state: dict) -> bool:
    out_dir = repo / out
    work = out_dir.with_name(out_dir.name + ".work")
    ckpts = list(work.glob("checkpoint-*")) if work.is_dir() else []
    if kind == "checkpoint":
        return any(not (c / "dpa_checkpoint_complete.json").exists() for c in ckpts)
    if kind == "output":
        return any(out_dir.parent.glob(f".{out_dir.name}.tmp-*")) if out_dir.parent.is_dir() else False
    if any((c / "dpa_checkpoint_complete.json").exists() for c in ckpts):
        state.setdefault("at", time.monotonic() + (rng.uniform(0.0, 0.2) if kind == "step" else 0.0))
    return "at" in state and time.monotonic() >= state["at"]


def _forget(repo: Path, stage: str) -> None:
    """Drop STAGE from dvc.lock: to DVC it is then a stage that never ran, as in a first `dvc repro`
    (with its lock entry in place DVC would check the old output out of its cache instead)."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    del lock["stages"][stage]
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def _run_and_kill(repo: Path, stage: str, kind: str, rng: random.Random, log: Path) -> str:
    """`dvc repro -s --no-run-cache STAGE`, SIGKILLed at the first moment `kind` is reached; says where it landed."""
    out, _ = STAGES[stage]
    _forget(repo, stage)
    with open(log, "a") as f:
        f.write(f"$ dvc repro -s --no-run-cache {stage}   # killed at: {kind}\n")
        f.flush()
        proc = subprocess.Popen([str(venv_bin() / "dvc"), "repro", "-s", "--no-run-cache", stage], cwd=repo,
                                env=subprocess_env(repo), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    state: dict = {}
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if _reached(repo, out, kind, rng, state):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            # read where the kill landed once nothing moves: a smoke stage can finish its last steps
            # and start writing its output within the step delay
            out_dir = repo / out
            running = out_dir.with_name(out_dir.name + ".work").is_dir()  # gone once the stage is done
            writing = any(out_dir.parent.glob(f".{out_dir.name}.tmp-*"))
            if not running:
                return f"killed after the stage finished ({kind} point)"
            return "killed during output" if writing else f"killed during {kind}"
        time.sleep(0.002)
    proc.wait(timeout=60)
    return f"finished before the {kind} point was seen (rc {proc.returncode})"


def _files(repo: Path, stage: str) -> dict[str, str]:
    import hashlib

    out = repo / STAGES[stage][0]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*"))
            if f.is_file()}


def _weights(repo: Path, stage: str) -> dict[str, torch.Tensor]:
    out, weights = STAGES[stage]
    return load_file(str(repo / out / weights))


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k] - b[k]).abs().max().item()}"


def test_kill_anywhere_then_dvc_repro_gives_the_uninterrupted_result(tmp_path):
    seed = int(os.environ.get("DPA_KILL_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    print(f"kill matrix seed {seed} (rerun with DPA_KILL_SEED={seed})")
    log = tmp_path / "dvc.log"
    repo = make_repo_copy(tmp_path, profile="smoke")
    # dvc.yaml's world stage depends on assets/toyworld (prebuilt base models), which is not in git;
    # the smoke profile does not use it (world.base_models: null), so an empty directory will do.
    (repo / "assets" / "toyworld").mkdir(parents=True, exist_ok=True)

    params = repo / "params.yaml"
    _dvc(repo, "repro", "finetune_proxy@dpa-0", log=log)  # the uninterrupted run
    reference = {s: _weights(repo, s) for s in STAGES}
    reference_files = {s: _files(repo, s) for s in STAGES}

    kinds = list(KINDS)
    rng.shuffle(kinds)
    landed = {}
    for stage, kind in zip(STAGES, kinds):
        landed[stage] = _run_and_kill(repo, stage, kind, rng, log)
        out, _ = STAGES[stage]
        out_dir = repo / out
        assert (not any(out_dir.parent.glob(f".{out_dir.name}.tmp-*")) or landed[stage] == "killed during output"
                or "finished" in landed[stage])
        # --no-run-cache: DVC would otherwise restore the uninterrupted run's output from its run
        # cache (right, but it would not exercise the resume)
        text = _dvc(repo, "repro", "-s", "--no-run-cache", stage, log=log)
        if landed[stage] == "killed during checkpoint":
            assert "skipping incomplete checkpoint" in text, text[-2000:]
        if landed[stage] == "killed during step":
            assert "resuming from" in text, text[-2000:]
        assert not any(out_dir.parent.glob(f".{out_dir.name}.tmp-*")), "a stale temporary survived the rerun"
        _assert_equal(_weights(repo, stage), reference[stage], f"{stage} after a kill during {kind}")
        # every file byte-identical (history.json, metrics.json too): DVC keeps downstream cached
        assert _files(repo, stage) == reference_files[stage], f"{stage} after a kill during {kind}"
    print("kills:", landed)
    # where a kill lands is a race (an output write of the smoke size takes milliseconds): at least
    # two of the three must land inside the stage for the matrix to count
    assert sum(v.startswith("killed during") for v in landed.values()) >= 2, landed

    # A settings change between the kill and the rerun: the proxy retrains with the new rank, and
    # align must start over against it, never resume the checkpoint trained against the old proxy.
    _run_and_kill(repo, "align_proxy@dpa-0", "first complete checkpoint", rng, log)
    work = repo / "outputs/align/dpa-seed0.work"
    assert list(work.glob("checkpoint-*/dpa_checkpoint_complete.json")), "no complete checkpoint to be stale"
    text = params.read_text()
    # params.yaml is composed from conf/ (block style); a hand edit is what `dvc repro` then sees
    params.write_text(re.sub(r"(proxy:\n  lora:\n    r: )16\n", r"\g<1>8\n", text, count=1))
    assert params.read_text() != text
    rerun = _dvc(repo, "repro", "align_proxy@dpa-0", log=log)
    assert "discarding the checkpoints in outputs/align/dpa-seed0.work" in rerun, rerun[-3000:]
    assert "inputs.proxy_adapter" in rerun
    assert "resuming from outputs/align" not in rerun
    after_kill = _weights(repo, "align_proxy@dpa-0")
    _dvc(repo, "repro", "-f", "-s", "--no-run-cache", "align_proxy@dpa-0", log=log)  # clean, with the new proxy
    _assert_equal(after_kill, _weights(repo, "align_proxy@dpa-0"), "align after a settings change")
